"""The RAM tier of evicted conversations (`edgevlm serve --conversation-cache-mb`): when a server gives a sequence
to another conversation, or empties it to make room, the sequence's state is parked here, keyed by the conversation
prefix it holds (the identity of every position, `Prompt.keys`). A later request that continues that prefix further
than its live sequence does restores it, instead of prefilling the conversation again. Bounded in bytes, least
recently parked first out; an entry is taken out when restored (the live sequence holds it again). With --cache-dir,
each parked state is written to the disk tier too (parked_disk.py): found there once RAM let it go, or after a
restart."""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

from .base import DecoderState
from .reuse import common_prefix, prefix_key


@dataclass(frozen=True)
class ParkedSequence:
    keys: tuple  # the identity of each position the state holds
    state: DecoderState

    def __post_init__(self) -> None:
        if len(self.keys) != self.state.n_past:
            raise ValueError(f"a parked state of {self.state.n_past} positions needs as many keys, "
                             f"got {len(self.keys)}")

    @property
    def nbytes(self) -> int:
        return int(self.state.nbytes)


class ParkedSequences:
    def __init__(self, max_bytes: int, disk=None):
        """disk: a DiskParked (serve --cache-dir), written through at every park."""
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self.disk = disk
        self.bytes = 0
        self._items: OrderedDict[str, ParkedSequence] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.max_bytes) or self.disk is not None

    def __len__(self) -> int:
        return len(self._items)

    def park(self, decoder_id: str, keys: Sequence, state: DecoderState) -> bool:
        """Keep `state` (holding `keys`) in RAM and on disk; False when it alone exceeds the RAM bound (not kept there)."""
        entry = ParkedSequence(tuple(keys), state)
        if self.disk is not None and keys:
            self.disk.put(entry.keys, state)
        if entry.nbytes > self.max_bytes or not keys:
            return False
        key = prefix_key(decoder_id, entry.keys, len(entry.keys))
        with self._lock:
            old = self._items.pop(key, None)
            self.bytes -= old.nbytes if old is not None else 0
            while self._items and self.bytes + entry.nbytes > self.max_bytes:
                self.bytes -= self._items.popitem(last=False)[1].nbytes
            self._items[key] = entry
            self.bytes += entry.nbytes
        return True

    def take(self, prompt_keys: Sequence, beyond: int) -> tuple[ParkedSequence, int] | None:
        """The parked conversation sharing the longest prefix with a prompt, if that is more than `beyond` positions
        (what the live sequence or an image-prefix state gives already), and how long; it leaves the tier."""
        with self._lock:
            best, best_shared = None, beyond
            for key, entry in self._items.items():
                shared = common_prefix(entry.keys, prompt_keys)
                if shared > best_shared:
                    best, best_shared = key, shared
            if best is None:
                return None
            entry = self._items.pop(best)
            self.bytes -= entry.nbytes
            return entry, best_shared

    def find(self, prompt_keys: Sequence, beyond: int) -> tuple[ParkedSequence, bool] | None:
        """The parked conversation sharing the longest prefix with the prompt beyond `beyond` positions, from RAM
        (taken out) or, when the disk tier holds a longer one, from disk; and whether it came from disk."""
        disk = self.disk.best(prompt_keys, beyond) if self.disk is not None else None
        memory = self.take(prompt_keys, disk[1] - 1 if disk is not None else beyond)  # a tie: RAM's copy
        if memory is not None:
            return memory[0], False
        if disk is None:
            return None
        loaded = self.disk.load(disk[0])
        return None if loaded is None else (ParkedSequence(*loaded), True)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0


def unpark(session, prompt, timings: dict) -> None:
    """Before a prefill: a parked conversation that `prompt` continues further than the session's live sequence and
    beyond its last image (an image prefix alone is the prefix cache's) is restored into the sequence, and the
    session's record says so; the reuse plan then keeps what matches. A state the decoder refuses is dropped."""
    live = session.shared_prefix_length(prompt.keys)
    found = session.parked.find(prompt.keys, max([live, *prompt.boundaries]))
    if found is None:
        missed = int(live <= max(prompt.boundaries, default=0))
        timings["conversation_cache_misses"] += missed
        timings["conversation_disk_misses"] += missed if session.parked.disk is not None else 0
        return
    entry, from_disk = found
    try:
        session.decoder.restore(entry.state)
    except RuntimeError:
        session.forget_sequence()
        timings["conversation_cache_misses"] += 1
        return
    session._kv_keys = list(entry.keys)
    timings["conversation_cache_hits"] += 1
    timings["conversation_disk_hits"] += int(from_disk)


def park(session) -> None:
    """Session.park_sequence's work: the live sequence's state to the parked tiers, when they are on and the
    record covers the whole sequence."""
    if session.parked.enabled and session._kv_keys and len(session._kv_keys) == session.decoder.n_past:
        session.parked.park(session._decoder_id, session._kv_keys, session.decoder.snapshot())
