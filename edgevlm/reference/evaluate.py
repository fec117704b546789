"""Task accuracy on held-out synthetic scenes: the yardstick that makes export and quantization damage visible."""
from __future__ import annotations

from typing import Callable, Iterator

from . import scenes

EVAL_SEED_BASE = 1_000_000_000  # disjoint from training seeds (edgevlm.reference.train.TRAIN_SEED_BASE + steps*batch)
DEFAULT_N = 200
MAX_ANSWER_TOKENS = 32


def evaluate(session, n: int = DEFAULT_N, seed_base: int = EVAL_SEED_BASE,
             progress: Callable[[int, int], None] | None = None, keep_examples: int = 0) -> dict:
    """Ask n questions (one of each type per image, in turn) with greedy decoding; exact match after normalizing."""
    if n < 1:
        raise ValueError("n must be >= 1")
    per_type = {t: [0, 0] for t in scenes.QUESTION_TYPES}
    examples = []
    asked = 0
    image, drawn = None, None
    for scene, qa in asked_questions(n, seed_base):
        if drawn is not scene:
            image, drawn = scenes.render(scene), scene
        result = session.generate(image, qa.question, max_tokens=MAX_ANSWER_TOKENS)
        correct = scenes.normalize(result.text) == scenes.normalize(qa.answer)
        per_type[qa.kind][0] += int(correct)
        per_type[qa.kind][1] += 1
        if len(examples) < keep_examples:
            examples.append({"question": qa.question, "answer": result.text, "truth": qa.answer, "correct": correct})
        asked += 1
        if progress:
            progress(asked, n)
    total_correct = sum(c for c, _ in per_type.values())
    return {
        "accuracy": total_correct / asked,
        "n": asked,
        "per_type": {t: (c / k if k else None) for t, (c, k) in per_type.items()},
        "per_type_n": {t: k for t, (_, k) in per_type.items()},
        "encoder": getattr(session, "encoder_name", None),
        "decoder": getattr(session, "decoder_name", None),
        **({"examples": examples} if keep_examples else {}),
    }


def asked_questions(n: int, seed_base: int = EVAL_SEED_BASE) -> Iterator[tuple]:
    """(scene, question) of the n questions `evaluate` asks, in order: one of each type per scene, in turn."""
    asked, image_index = 0, 0
    while asked < n:
        scene = scenes.make_scene(seed_base + image_index)
        for qa in scenes.questions(scene, scenes.question_rng(seed_base + image_index)).values():
            if asked >= n:
                return
            yield scene, qa
            asked += 1
        image_index += 1


def evaluation_job(n: int = DEFAULT_N, seed_base: int = EVAL_SEED_BASE):
    """What `evaluate` will ask (every scene is drawn at the same size, so one image stands for all): the job that
    sizes a llama.cpp context (runtimes/job_context.py)."""
    from ..runtimes.job_context import Job

    pairs = list(asked_questions(n, seed_base))
    return Job(tuple(dict.fromkeys(qa.question for _, qa in pairs)), (scenes.render(pairs[0][0]),), MAX_ANSWER_TOKENS)
