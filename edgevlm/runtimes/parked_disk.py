"""The disk tier of parked conversations (`edgevlm serve --cache-dir`, bounded by --cache-dir-mb with the other disk
entries): every state parked in RAM (parked.py) is also written to the DiskCache, so a conversation comes back after
its RAM entry was pushed out, and after a restart. Entries live in the namespace `conversation|<the decoder's state
signature>` (a state is never restored into another model or context setting), keyed by the prefix they hold; one
more entry of that namespace, `index`, lists each entry's keys (the identity of each position, text runs as token
ids and image runs as [image key, first row, rows]) so a restarted server finds the longest continued one without
reading the states. Writes go through DiskCache.put (temporary name, then rename; checked by sha256 when read) on a
thread of their own, off the engine thread; the index names an entry only once its state is on disk."""
from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

from .base import DecoderState
from .reuse import common_prefix, prefix_key

INDEX = "index"


def encode_keys(keys: Sequence) -> list:
    """Position identities as JSON: a text token as its id, a run of one image's consecutive rows as one triple."""
    out: list = []
    for key in keys:
        if isinstance(key, tuple):
            last = out[-1] if out else None
            if isinstance(last, list) and last[0] == key[0] and last[1] + last[2] == key[1]:
                last[2] += 1
                continue
            out.append([key[0], key[1], 1])
        else:
            out.append(int(key))
    return out


def decode_keys(encoded: list) -> tuple:
    keys: list = []
    for item in encoded:
        if isinstance(item, list):
            image, first, rows = item
            keys.extend((image, first + i) for i in range(rows))
        else:
            keys.append(int(item))
    return tuple(keys)


class DiskParked:
    def __init__(self, disk, state_signature: str, decoder_id: str):
        self.disk, self.decoder_id = disk, decoder_id
        self.namespace = f"conversation|{state_signature}"
        self._lock = threading.Lock()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="edgevlm-park-disk")
        self._pending: list[Future] = []
        self._index: dict[str, tuple] = {}  # entry key -> the keys its state holds
        found = disk.get(self.namespace, INDEX)
        if found is not None:
            try:
                stored = json.loads(found[1])
                self._index = {key: decode_keys(keys) for key, keys in stored.items() if disk.has(self.namespace, key)}
            except (ValueError, TypeError, KeyError):
                self._index = {}

    def __len__(self) -> int:
        return len(self._index)

    def put(self, keys: tuple, state: DecoderState) -> None:
        """Write `state` (holding `keys`) in the background; entries it continues are dropped from the index."""
        payload = bytes(state.payload)
        key = prefix_key(self.decoder_id, keys, len(keys))

        def write() -> None:
            if not self.disk.put(self.namespace, key, payload, n_past=state.n_past, next_position=state.next_position):
                return
            with self._lock:
                for old in [k for k, held in self._index.items() if k != key and common_prefix(held, keys) == len(held)]:
                    del self._index[old]  # a shorter state of the same conversation: this one holds all of it
                self._index[key] = keys
                self._write_index()

        with self._lock:
            self._pending = [f for f in self._pending if not f.done()] + [self._writer.submit(write)]

    def _write_index(self) -> None:
        payload = json.dumps({k: encode_keys(held) for k, held in self._index.items()}).encode()
        self.disk.put(self.namespace, INDEX, payload)

    def best(self, prompt_keys: Sequence, beyond: int) -> tuple[str, int] | None:
        """The entry sharing the longest prefix with the prompt, if more than `beyond` positions, and how long."""
        with self._lock:
            best, best_shared = None, beyond
            for key, held in self._index.items():
                shared = common_prefix(held, prompt_keys)
                if shared > best_shared:
                    best, best_shared = key, shared
        return None if best is None else (best, best_shared)

    def load(self, key: str) -> tuple[tuple, DecoderState] | None:
        """The entry's keys and state; None (and the entry leaves the index) when its file is gone or does not check
        out (DiskCache deletes such a file)."""
        found = self.disk.get(self.namespace, key)
        with self._lock:
            keys = self._index.get(key)
            if found is None or keys is None or found[0].get("n_past") != len(keys):
                if self._index.pop(key, None) is not None:
                    self._write_index()
                return None
        header, payload = found
        return keys, DecoderState(payload, header["n_past"], len(payload), header["next_position"])

    def flush(self, timeout: float = 60) -> None:
        """Wait for the writes in flight (a server closing, tests)."""
        with self._lock:
            pending, self._pending = self._pending, []
        for future in pending:
            future.result(timeout)

    def close(self) -> None:
        self.flush()
        self._writer.shutdown(wait=True)
