"""Task accuracy on held-out synthetic scenes: the yardstick that makes export and quantization damage visible."""
from __future__ import annotations

from typing import Callable

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
    image_index = 0
    while asked < n:
        seed = seed_base + image_index
        scene = scenes.make_scene(seed)
        image = scenes.render(scene)
        for qa in scenes.questions(scene, scenes.question_rng(seed)).values():
            if asked >= n:
                break
            result = session.generate(image, qa.question, max_tokens=MAX_ANSWER_TOKENS)
            correct = scenes.normalize(result.text) == scenes.normalize(qa.answer)
            per_type[qa.kind][0] += int(correct)
            per_type[qa.kind][1] += 1
            if len(examples) < keep_examples:
                examples.append({"question": qa.question, "answer": result.text, "truth": qa.answer, "correct": correct})
            asked += 1
            if progress:
                progress(asked, n)
        image_index += 1
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
