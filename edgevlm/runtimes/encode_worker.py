"""Image encodes off the decode path (`edgevlm serve --parallel N`): one worker thread runs every slot's encodes, with
the encoder's own thread budget (`--encode-threads`, ONNX Runtime's intra-op threads), while the engine thread keeps
decoding the other slots. A generation that needs an image encoded yields `EncodeWait` until its rows are there; the
scheduler advances it again once the future is done. One thread: two requests for one new image queue one behind
the other, so the second finds the first's rows in the cache (and `SingleFlight` still guards any encode run beside
the worker), and the encoder (one ORT session) is never run by two threads at once.

How the cores are split: while an encode runs, the decoder's context runs `decode_threads_while_encoding` threads
(llama.cpp's threads wait for each other at every op, so one of them preempted by the encoder stalls a whole step),
and all its threads again once no encode is in flight."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from .embeddings import image_embeddings
from .requests import PAUSE, Pause


def default_encode_threads(threads: int) -> int:
    """The encoder's share of `threads` cores in a server: half, at least one (on 2 cores: encode 1, decode 1 while
    an encode runs, decode 2 otherwise; see docs/notes/2026-12-07-serve-encode.md for the measurement)."""
    return max(1, threads // 2)


def decode_threads_while_encoding(threads: int, encode_threads: int) -> int:
    return max(1, threads - encode_threads)


@dataclass(frozen=True)
class EncodeWait:
    """Yielded by a generation while its image is encoded on the worker: advance it again once `future` is done."""

    future: Future


class EncodeWorker:
    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="edgevlm-encode")
        self.submitted = 0

    def submit(self, compute: Callable[[], Any]) -> Future:
        self.submitted += 1
        return self._pool.submit(compute)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def embeddings_between(session, prompt, images, start: int, stop: int, timings: dict,
                       ) -> Iterator[Pause | EncodeWait]:
    """The embeddings of the images in prompt positions [start, stop), by image index (a generator: `return`s
    them). An image in the memory cache is taken at once; one that needs the disk tier or the encoder goes to the
    session's encode worker (EncodeWait until it is done), or, with no worker, is encoded here and followed by a
    PAUSE. The worker fills `timings` while the generation waits, never at the same time."""
    encoded: dict[int, np.ndarray] = {}
    worker = session.encode_worker
    for run_start, run_stop, idx, _ in prompt.runs:
        if run_stop <= start or run_start >= stop or idx in encoded:
            continue
        image = images[idx]
        if worker is None or image.key in session.embed_cache:
            misses = timings["embed_cache_misses"]
            encoded[idx] = session._embeddings(image, timings)
            if timings["embed_cache_misses"] > misses:
                yield PAUSE
            continue
        future = worker.submit(lambda image=image: session._embeddings(image, timings))
        while not future.done():
            yield EncodeWait(future)
        encoded[idx] = future.result()
    return encoded
