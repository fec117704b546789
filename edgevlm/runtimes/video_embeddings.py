"""A video's embeddings through the caches, one unit at a time (a temporal patch of 2 frames for Qwen2-VL /
Qwen2.5-VL, whose tower attends only inside one; a frame for families that encode frames alone): memory, then the
disk tier, then the encoder, with the same single flight as images. A unit's key is its frames' content, the
preprocessing and the encoder artifact, never its place in the clip, so a window advanced by k units encodes
exactly k and a second question about the same clip encodes none."""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .cache import ByteLRU
from .embeddings import SingleFlight


@dataclass(frozen=True)
class PreparedVideo:
    """A video in a prompt, the session's counterpart of PreparedImage: one run of rows, unit after unit."""

    key: str  # the whole video's identity (its units' keys and positions)
    unit_keys: tuple[str, ...]  # per unit: content + preprocessing + encoder artifact
    rows_per_unit: int  # embedding rows one unit gives (merged tokens of one temporal patch)
    # unit k -> (pixel values, grid) for the encoder: (P, patch_dim) patches and (1, h, w) for a grid encoder
    unit_inputs: Callable[[int], tuple[np.ndarray, tuple[int, int, int] | None]]
    rows: int = 1  # a unit's merged grid (M-RoPE places each unit's rows on it)
    cols: int = 1
    instruction: None = None  # what PreparedImage carries for encoders that read the prompt: never for video

    def __post_init__(self) -> None:
        if not self.unit_keys or self.rows_per_unit < 1:
            raise ValueError(f"a video needs at least one unit of at least one row, got {len(self.unit_keys)} units "
                             f"of {self.rows_per_unit}")

    @property
    def n_units(self) -> int:
        return len(self.unit_keys)

    @property
    def n_rows_embedded(self) -> int:
        return self.n_units * self.rows_per_unit


def unit_key(content_key: str, encoder_id: str) -> str:
    return hashlib.sha256(f"video-unit {content_key} {encoder_id}".encode()).hexdigest()


def video_embeddings(video: PreparedVideo, encoder, memory: ByteLRU, disk, flights: SingleFlight,
                     timings: dict) -> np.ndarray:
    """(units * rows_per_unit, D) float32 rows of `video`; each unit found in a cache counts a hit and
    `video_units_reused`, each encoded one a miss and `video_units_encoded`."""
    return np.concatenate([_unit_rows(video, k, encoder, memory, disk, flights, timings)
                           for k in range(video.n_units)])


def _unit_rows(video: PreparedVideo, k: int, encoder, memory: ByteLRU, disk, flights: SingleFlight,
               timings: dict) -> np.ndarray:
    key = video.unit_keys[k]
    cached = memory.get(key)
    if cached is not None:
        timings["embed_cache_hits"] += 1
        timings["video_units_reused"] += 1
        return cached

    def lead() -> tuple[np.ndarray, str]:
        again = memory.peek(key)
        if again is not None:
            return again, "memory"
        if disk is not None:
            rows = disk.get_array("embeddings", key)
            if rows is not None and rows.shape[0] == video.rows_per_unit:
                memory.put(key, rows)
                return rows, "disk"
        rows = _encode_unit(video, k, encoder, timings)
        memory.put(key, rows)
        if disk is not None:
            disk.put_array("embeddings", key, rows)
        return rows, "encoded"

    (rows, source), led = flights.run(key, lead)
    if led and source == "encoded":
        timings["embed_cache_misses"] += 1
        timings["video_units_encoded"] += 1
    else:
        timings["embed_cache_hits"] += 1
        timings["disk_cache_hits"] += int(led and source == "disk")
        timings["video_units_reused"] += 1
    return rows


def _encode_unit(video: PreparedVideo, k: int, encoder, timings: dict) -> np.ndarray:
    t0 = time.perf_counter()
    pixel_values, grid = video.unit_inputs(k)
    t1 = time.perf_counter()
    embeds = encoder.encode(pixel_values) if grid is None else encoder.encode(pixel_values, grid=grid)
    t2 = time.perf_counter()
    timings["preprocess_ms"] += (t1 - t0) * 1e3
    timings["encode_ms"] += (t2 - t1) * 1e3
    timings["n_tiles"] += 1
    rows = np.ascontiguousarray(np.asarray(embeds).reshape(-1, np.asarray(embeds).shape[-1]), dtype=np.float32)
    if rows.shape[0] != video.rows_per_unit:
        raise RuntimeError(f"encoder returned {rows.shape[0]} rows for a video unit that needs {video.rows_per_unit}; "
                           "the encoder and the video layout disagree")
    return rows
