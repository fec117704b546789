"""Sampling against transformers' logits processors; the byte-bounded LRU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgevlm.runtimes.cache import ByteLRU
from edgevlm.runtimes.sampling import Sampler, SamplingConfig


def test_greedy_is_argmax():
    logits = np.array([0.1, 3.0, -1.0, 2.9], dtype=np.float32)
    assert Sampler(SamplingConfig()).sample(logits, []) == 1


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(0)
    logits = rng.normal(size=50).astype(np.float32)
    history = [3, 7, 7, 11, 42]
    ours = Sampler(SamplingConfig(repetition_penalty=1.3)).penalize(logits, history)
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([history]), torch.from_numpy(logits)[None])[0].numpy()
    assert np.allclose(ours, theirs, atol=1e-6)


def test_top_k_and_top_p_restrict_the_support():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    top_k = Sampler(SamplingConfig(temperature=1.0, top_k=2, seed=0))
    assert {top_k.sample(logits, []) for _ in range(300)} == {0, 1}
    top_p = Sampler(SamplingConfig(temperature=1.0, top_p=0.8, seed=0))
    assert {top_p.sample(logits, []) for _ in range(300)} == {0, 1}  # 0.5 + 0.3 reaches 0.8


def test_seed_makes_sampling_reproducible():
    logits = np.random.default_rng(1).normal(size=100)
    a = [Sampler(SamplingConfig(temperature=0.9, seed=5)).sample(logits, []) for _ in range(3)]
    b = [Sampler(SamplingConfig(temperature=0.9, seed=5)).sample(logits, []) for _ in range(3)]
    assert a == b


def test_temperature_distribution():
    logits = np.log(np.array([0.7, 0.2, 0.1]))
    sampler = Sampler(SamplingConfig(temperature=1.0, seed=0))
    counts = np.bincount([sampler.sample(logits, []) for _ in range(4000)], minlength=3) / 4000
    assert np.allclose(counts, [0.7, 0.2, 0.1], atol=0.03)


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5),
                                    dict(repetition_penalty=0)])
def test_invalid_config(kwargs):
    with pytest.raises(ValueError):
        SamplingConfig(**kwargs)


def test_lru_respects_byte_bound_and_counts():
    cache = ByteLRU(max_bytes=100)
    cache.put("a", np.zeros(10, np.float32))  # 40 bytes
    cache.put("b", np.zeros(10, np.float32))  # 80
    assert cache.get("a") is not None  # a is now most recent
    cache.put("c", np.zeros(10, np.float32))  # 120 > 100: evicts b (least recent)
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.bytes == 80 <= cache.max_bytes
    assert cache.get("b") is None
    assert (cache.hits, cache.misses, cache.evictions) == (1, 1, 1)
    assert cache.put("huge", np.zeros(100, np.float32)) is False
    assert cache.bytes <= cache.max_bytes
