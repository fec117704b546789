"""KV reuse planning, pure: how much of a new prompt the live sequence already holds, which cached prefix (ending
right after an image) to restore, and where to snapshot for the next request."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence


def common_prefix(a: Sequence, b: Sequence) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def prefix_key(decoder_id: str, keys: Sequence, stop: int) -> str:
    """A hash of the first `stop` positions: each text token, and each image occurrence as (image key, where it
    starts, its first row, how many rows), so the same image twice, or once more in a longer prompt, never collides."""
    digest = hashlib.sha256(f"{decoder_id}|{stop}|".encode())
    pos = 0
    while pos < stop:
        key = keys[pos]
        if not isinstance(key, tuple):
            digest.update(b"t%d," % key)
            pos += 1
            continue
        start, first_row = pos, key[1]
        while pos < stop and isinstance(keys[pos], tuple) and keys[pos][0] == key[0] and keys[pos][1] == first_row + pos - start:
            pos += 1
        digest.update(f"i{key[0]}@{start}:{first_row}+{pos - start},".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class ReusePlan:
    reuse: int  # positions kept (or restored): prefill starts here
    restore_key: str | None  # a prefix-cache entry to restore first (it ends at `reuse`)
    store_at: int | None  # snapshot the sequence once it reaches this boundary
    counted_miss: bool  # a boundary beyond the live sequence was looked up and not found


def plan_reuse(prompt_keys: Sequence, boundaries: Sequence[int], kv_keys: Sequence, n_past: int, decoder_id: str,
               cached: Callable[[str], bool], prefix_lm: bool = False) -> ReusePlan:
    """prefix_lm: the prompt is one bidirectional block (PaliGemma), so every position of it depends on the whole
    prompt: neither the live sequence (not even the same prompt, whose last position would be prefilled alone) nor a
    snapshot of an earlier prompt that starts the same is valid, and no snapshot inside the prompt is worth storing.
    The whole prompt is prefilled (image embeddings still come from their cache)."""
    if prefix_lm:
        return ReusePlan(0, None, None, False)
    n = len(prompt_keys)
    # 1. what the live sequence already holds (a chat turn, the same image asked again); the last position is always
    # prefilled again, since its logits are needed
    reuse = min(common_prefix(kv_keys, prompt_keys), n_past, n - 1)
    # 2. a cached prefix that ends after an image and goes further than that
    restore_key = None
    for boundary in sorted(boundaries, reverse=True):
        if reuse < boundary < n and cached(key := prefix_key(decoder_id, prompt_keys, boundary)):
            restore_key, reuse = key, boundary
            break
    missed = restore_key is None and any(reuse < b < n for b in boundaries)
    # 3. snapshot right after the last image, so the next question about it restores from there
    store_at = max((b for b in boundaries if reuse < b < n), default=None)
    return ReusePlan(reuse, restore_key, store_at, missed)
