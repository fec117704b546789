"""A prompt prefix's decoder state, stored and restored: the session snapshots its sequence at an image boundary
(keyed by the decoder and the identity of every position before it, reuse.prefix_key) into the memory tier and, with
serve --cache-dir, the disk tier; a later prompt with the same prefix restores it instead of prefilling it again.
`session`: the Session that calls (as in parked.py; session.py imports this module, not the other way)."""
from __future__ import annotations

import time

from .base import DecoderState
from .prompt import Prompt
from .reuse import prefix_key


def restore_prefix(session, key: str, boundary: int) -> bool:
    """Restore a cached prefix (from memory, else from disk into memory); a state that is not the boundary it was
    stored for, or that the decoder refuses, is dropped and the sequence starts empty."""
    namespace = session._state_namespace
    state = session.prefix_cache.peek(key)
    if state is None and namespace is not None:
        found = session.disk_cache.get(namespace, key)
        if found is not None:
            header, payload = found
            state = DecoderState(payload, header.get("n_past"), len(payload), header.get("next_position"))
            session.prefix_cache.put(key, state)
    if state is None or state.n_past != boundary:
        session.prefix_cache.pop(key)
        return False
    try:
        session.decoder.restore(state)
    except RuntimeError:
        session.prefix_cache.pop(key)
        session.forget_sequence()
        return False
    session._kv_keys = []  # the decoder now holds exactly the restored prefix
    return True


def store_prefix(session, prompt: Prompt, stop: int, timings: dict) -> None:
    """Snapshot the sequence, which holds prompt positions [0, stop), under the prefix's key in every tier."""
    t0 = time.perf_counter()
    state, key = session.decoder.snapshot(), prefix_key(session._decoder_id, prompt.keys, stop)
    session.prefix_cache.put(key, state)
    namespace = session._state_namespace
    if namespace is not None:
        session.disk_cache.put(namespace, key, bytes(state.payload), n_past=state.n_past,
                               next_position=state.next_position)
    timings["snapshot_ms"] += (time.perf_counter() - t0) * 1e3
