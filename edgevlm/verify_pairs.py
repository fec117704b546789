"""verify's pair gate: every encoder x decoder pair the bundle ships, end to end on held-out questions, against the
PyTorch reference: teacher-forced on the reference's answers (top-1 agreement and logit NMSE over the answer tokens),
and on the reference model (the bundle's checkpoint is edgevlm's trained reference) its task accuracy too.

Artifacts are each judged alone first (verify.py); a pair can still fail where each part passes its own gate (an int8
encoder a little off in every tile, which the decoder amplifies), and only the pair is what a user ships."""
from __future__ import annotations

import numpy as np

from .metrics import DECODER_GATES, ENCODER_GATES, nmse, pair_gate, top1_agreement
from .verify_rows import RANDOM_WEIGHTS_NOTE, failure, judged_row

PAIR_SEED_BASE = 7_000_000_000  # held out: training < 1e8, eval from 1e9, the artifact probes at 4e9
PAIR_IMAGES = 3  # x one question of each type (5): 15 questions
PAIR_ANSWER_TOKENS = 16
PAIR_EVAL_QUESTIONS = 40  # the reference model's task accuracy per pair (edgevlm eval's held-out questions)


def _held_out(reference) -> list[tuple]:
    """(image, question, answer tokens with the stop token the reference ended on, the reference's logits)."""
    from .reference import scenes

    probes = []
    for i in range(PAIR_IMAGES):
        seed = PAIR_SEED_BASE + i
        scene = scenes.make_scene(seed)
        image = scenes.render(scene)
        for qa in scenes.questions(scene, scenes.question_rng(seed)).values():
            result = reference.generate(image, qa.question, max_tokens=PAIR_ANSWER_TOKENS, return_logits=True)
            tokens = list(result.tokens)
            if result.finish_reason == "stop":  # the stop token is part of the answer: its position is judged too
                tokens.append(int(np.argmax(result.logits[-1])))
            probes.append((image, qa.question, tokens, np.stack(result.logits)))
    return probes


def _pairs(manifest) -> list[tuple[str, str]]:
    """Every runnable encoder x decoder with a known gate (an unknown precision FAILed on its own row already)."""
    encoders = [n for n in manifest.names("encoder", runnable=True) + manifest.names("engine")
                if n.split(":", 1)[1] in ENCODER_GATES]
    return [(e, d) for e in encoders for d in manifest.names("decoder") if d in DECODER_GATES]


def _accuracy(session, n: int) -> float:
    from .reference.evaluate import evaluate

    return evaluate(session, n=n)["accuracy"]


def pair_rows(bundle, manifest, ckpt, spec, weights: dict, threads, log) -> list[dict]:
    """One row per encoder x decoder pair: judged, "unjudged" (not run: its gate needs trained weights), skipped or
    FAIL (a part that does not load)."""
    from .runtimes.bundle_loader import make_decoder, make_encoder
    from .runtimes.session import Session
    from .runtimes.torch_backend import TorchEncoder
    from .runtimes.torch_seq2seq import torch_decoder

    pairs = _pairs(manifest)
    if not pairs:
        return []
    trained, reference_model = weights["trained"], weights["reference_model"] and weights["trained"]
    reference = Session(spec, TorchEncoder(ckpt.vision, "torch"),
                        torch_decoder(ckpt.decoder, position_scheme=spec.position_scheme,
                                      deepstack_layers=ckpt.deepstack_layers, image_attention=spec.image_attention))
    probes = None
    reference_accuracy = None
    out = []
    for encoder_name, decoder_name in pairs:
        name = f"{encoder_name} + {decoder_name}"
        gate = pair_gate(encoder_name.split(":", 1)[1], decoder_name, reference_model)
        if gate.trained_only and not trained:  # nothing it could say: not run
            out.append({"artifact": name, "role": "pair", "status": "unjudged", "criterion": gate.criterion,
                        "note": RANDOM_WEIGHTS_NOTE,
                        "checks": [{"metric": b.metric, "value": None, "gate": b.text, "verdict": "not judged"}
                                   for b in gate.bounds]})
            continue
        log(f"pair {name}")
        if probes is None:
            probes = _held_out(reference)
        try:
            session = Session(spec, make_encoder(bundle, manifest, encoder_name, threads=threads),
                              make_decoder(bundle, manifest, decoder_name, threads=threads,
                                           parity=DECODER_GATES[decoder_name].min_agreement == 1.0))
            ours = np.concatenate([np.stack(session.teacher_forced_logits(image, question, tokens))
                                   for image, question, tokens, _ in probes])
            values = {"nmse": nmse(ours, np.concatenate([p[3] for p in probes])),
                      "greedy_agreement": top1_agreement(ours, np.concatenate([p[3] for p in probes]))}
            if gate.max_accuracy_drop is not None:
                if reference_accuracy is None:
                    reference_accuracy = _accuracy(reference, PAIR_EVAL_QUESTIONS)
                accuracy = _accuracy(session, PAIR_EVAL_QUESTIONS)
                values.update(accuracy=accuracy, reference_accuracy=reference_accuracy,
                              accuracy_drop=reference_accuracy - accuracy)
        except Exception as exc:
            out.append(failure(name, "pair", exc))
            continue
        out.append(judged_row(name, "pair", gate, values, trained,
                              note=f"{sum(len(p[2]) for p in probes)} answer tokens of {len(probes)} held-out questions"))
    return out
