"""An image's embeddings through the caches: memory (ByteLRU), then the disk tier, then the encoder, with single
flight: while one caller encodes an image, another asking for the same image waits for those rows instead of
encoding it again (sessions on the sequences of one context share the caches and the flights; an encode on a
thread of its own must never be doubled by a second request for the same new image)."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

import numpy as np

from ..preprocess import preprocess, preprocess_square_view
from .cache import ByteLRU
from .prompt import PreparedImage


class _Flight:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.failed = False


class SingleFlight:
    """Concurrent calls for one key: the first runs `compute`, the others wait for its value. A failed leader's
    followers try again themselves (each then gets its own error)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, _Flight] = {}

    def run(self, key: str, compute: Callable[[], Any]) -> tuple[Any, bool]:
        """(value, whether this call computed it)."""
        while True:
            with self._lock:
                flight = self._running.get(key)
                leader = flight is None
                if leader:
                    flight = self._running[key] = _Flight()
            if not leader:
                flight.done.wait()
                if flight.failed:
                    continue
                return flight.value, False
            try:
                flight.value = compute()
            except BaseException:
                flight.failed = True
                raise
            finally:
                with self._lock:
                    del self._running[key]
                flight.done.set()
            return flight.value, True


def image_embeddings(image: PreparedImage, encoder, preprocess_spec, memory: ByteLRU, disk, flights: SingleFlight,
                     timings: dict) -> np.ndarray:
    """(tiles*T, D) float32 rows of `image`; `timings` counts the hit or the miss (a wait for another caller's
    encode is a hit) and, for a miss, the preprocess and encode time. `disk`: a DiskCache or None."""
    frame = int(image.frame_preprocess is not None)  # a video frame also counts as a video unit
    cached = memory.get(image.key)
    if cached is not None:
        timings["embed_cache_hits"] += 1
        timings["video_units_reused"] += frame
        return cached

    def lead() -> tuple[np.ndarray, str]:
        again = memory.peek(image.key)  # a flight that ended between the lookup above and this one
        if again is not None:
            return again, "memory"
        if disk is not None:
            rows = disk.get_array("embeddings", image.key)
            if rows is not None and rows.shape[0] == image.n_rows_embedded:
                memory.put(image.key, rows)
                return rows, "disk"
        rows = _encode(image, encoder, preprocess_spec, timings)
        memory.put(image.key, rows)
        if disk is not None:
            disk.put_array("embeddings", image.key, rows)
        return rows, "encoded"

    (rows, source), led = flights.run(image.key, lead)
    if led and source == "encoded":
        timings["embed_cache_misses"] += 1
        timings["video_units_encoded"] += frame
    else:
        timings["embed_cache_hits"] += 1
        timings["disk_cache_hits"] += int(led and source == "disk")
        timings["video_units_reused"] += frame
    return rows


def _encode(image: PreparedImage, encoder, preprocess_spec, timings: dict) -> np.ndarray:
    t0 = time.perf_counter()
    if image.frame_preprocess is not None:  # a video frame: its family's frame preprocessing
        pre = image.frame_preprocess(image.rgb)
    elif image.square_view:
        pre = preprocess_square_view(image.rgb, preprocess_spec)
    else:
        pre = preprocess(image.rgb, preprocess_spec)
    t1 = time.perf_counter()
    if image.instruction is not None:  # the encoder reads the prompt's instruction ids too (InstructBLIP)
        embeds = encoder.encode(pre.pixel_values, instruction=image.instruction)
    elif pre.grid is None:
        embeds = encoder.encode(pre.pixel_values)  # (tiles, T, D)
    else:  # a native-resolution encoder: (P, C*T*p*p) patches of a (t, h, w) grid -> (M, D)
        embeds = encoder.encode(pre.pixel_values, grid=pre.grid)
    t2 = time.perf_counter()
    timings["preprocess_ms"] += (t1 - t0) * 1e3
    timings["encode_ms"] += (t2 - t1) * 1e3
    # a native-resolution image is one encoder input (its rows are patches, not tiles)
    timings["n_tiles"] += pre.pixel_values.shape[0] if pre.grid is None else 1
    if pre.source_size is not None:  # anyres: unpad, pool and add newlines (numpy, every encoder backend alike)
        embeds = preprocess_spec.pack_anyres(embeds, *pre.source_size)
    rows = np.ascontiguousarray(embeds.reshape(-1, embeds.shape[-1]), dtype=np.float32)  # (tiles*T, D)
    if rows.shape[0] != image.n_rows_embedded:
        raise RuntimeError(
            f"encoder returned {rows.shape[0]} rows for an image that needs {image.n_rows_embedded}; "
            "the encoder and the manifest's image layout disagree"
        )
    return rows
