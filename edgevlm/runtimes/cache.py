"""A least-recently-used map bounded in bytes, with hit/miss counters: image embeddings and decoder prefix states.
Safe to share between threads (an encode may run beside the engine thread)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any


def nbytes_of(value: Any) -> int:
    size = getattr(value, "nbytes", None)
    if size is None:
        raise TypeError(f"cannot size a {type(value).__name__} for the cache: it needs an .nbytes")
    return int(size)


class ByteLRU:
    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, Any] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._lock = threading.RLock()

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> Any | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
            return None

    def peek(self, key: str) -> Any | None:
        """Look without counting or reordering."""
        return self._items.get(key)

    def put(self, key: str, value: Any) -> bool:
        """Store; returns False when the value alone is larger than the bound (then nothing is kept)."""
        size = nbytes_of(value)
        with self._lock:
            if key in self._items:
                self.bytes -= nbytes_of(self._items.pop(key))
            if size > self.max_bytes:
                return False
            while self.bytes + size > self.max_bytes and self._items:
                _, old = self._items.popitem(last=False)
                self.bytes -= nbytes_of(old)
                self.evictions += 1
            self._items[key] = value
            self.bytes += size
            return True

    def pop(self, key: str) -> Any | None:
        """Drop an entry (a state that turned out unusable); returns it, or None."""
        with self._lock:
            value = self._items.pop(key, None)
            if value is not None:
                self.bytes -= nbytes_of(value)
            return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0
