"""The server's Prometheus metrics at /metrics, through prometheus_client with a registry of the server's own (never
the process-global one: two servers in one process, as in the tests, count apart). Events (requests, cancellations,
batched steps, TTFT and decode rates, cache hits) are counted as they happen; the engine's state (queue, slots, KV)
is read when /metrics is scraped."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the text format generate_latest writes
TTFT_BUCKETS_MS = (50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)
RATE_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 1000)
CACHE_KEYS = ("prefix_cache_hits", "prefix_cache_misses", "embed_cache_hits", "embed_cache_misses",
              "conversation_cache_hits", "conversation_cache_misses", "conversation_disk_hits",
              "conversation_disk_misses")


@dataclass(frozen=True)
class SlotState:
    """One sequence as /health and /metrics show it: idle (its KV kept for the conversation it holds) or not."""

    id: int
    state: str  # "idle" | "busy" (a slot that decodes its own tokens) | "prefill" | "decode"
    n_past: int  # KV positions its sequence holds

    def as_dict(self) -> dict:
        return {"id": self.id, "state": self.state, "n_past": self.n_past}


@dataclass(frozen=True)
class EngineState:
    """A snapshot of the engine, taken from a handler thread (plain ints: a snapshot is good enough)."""

    queue_depth: int
    active: int
    kv_used: int | None
    kv_size: int | None
    slots: list[SlotState] = field(default_factory=list)


class Metrics:
    """Counters and histograms of one server; `render` adds the engine's state as gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("edgevlm_requests", "requests answered, by outcome (HTTP status, or disconnected)",
                                ["outcome"], registry=self.registry)
        self.cancelled = Counter("edgevlm_cancelled", "answers stopped because their client left or timed out",
                                 registry=self.registry)
        self.batches = Counter("edgevlm_decode_batches", "batched decode calls (--parallel)", registry=self.registry)
        self.batch_rows = Counter("edgevlm_decode_batch_rows",
                                  "sequences those calls held (rows / batches = slots per step)", registry=self.registry)
        self.ttft = Histogram("edgevlm_ttft_ms", "time to first token, ms", buckets=TTFT_BUCKETS_MS,
                              registry=self.registry)
        self.rate = Histogram("edgevlm_decode_tok_s", "decode rate per answer, tokens/s", buckets=RATE_BUCKETS,
                              registry=self.registry)
        self._lock = threading.Lock()
        self._cache = dict.fromkeys(CACHE_KEYS, 0)  # kept here too: the hit ratio is computed from them
        self._state: Callable[[], EngineState] | None = None
        self.registry.register(_StateCollector(self))

    def watch(self, state: Callable[[], EngineState]) -> None:
        """Where the gauges come from at scrape time (the engine's `state`)."""
        self._state = state

    def count(self, outcome: str) -> None:
        self.requests.labels(outcome=outcome).inc()

    def observe(self, timings: dict) -> None:
        """One finished answer's timings: TTFT, decode rate and its cache hits and misses."""
        ttft, rate = timings.get("ttft_ms"), timings.get("decode_tok_s")
        if isinstance(ttft, (int, float)):
            self.ttft.observe(ttft)
        if isinstance(rate, (int, float)) and rate > 0:
            self.rate.observe(rate)
        with self._lock:
            for key in CACHE_KEYS:
                value = timings.get(key)
                if isinstance(value, (int, float)):
                    self._cache[key] += int(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector:
    """The gauges read at scrape time: queue depth, active sequences, cache counters and hit ratio, KV occupancy
    overall and per slot."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self) -> Iterator:
        with self.metrics._lock:
            cache = dict(self.metrics._cache)
        for key, value in cache.items():
            yield CounterMetricFamily(f"edgevlm_{key}", key.replace("_", " "), value=value)
        hits = cache["prefix_cache_hits"] + cache["embed_cache_hits"] + cache["conversation_cache_hits"]
        looks = sum(v for k, v in cache.items() if not k.startswith("conversation_disk"))  # a subset of the above
        yield GaugeMetricFamily("edgevlm_cache_hit_ratio",
                                "cache hits / lookups (prefix, embedding and conversation caches)",
                                value=hits / looks if looks else 0.0)
        if self.metrics._state is None:
            return
        state = self.metrics._state()
        yield GaugeMetricFamily("edgevlm_queue_depth", "requests waiting for a slot", value=state.queue_depth)
        yield GaugeMetricFamily("edgevlm_active_sequences", "slots answering a request", value=state.active)
        if state.kv_used is not None and state.kv_size:
            yield GaugeMetricFamily("edgevlm_kv_occupancy", "KV positions in use / the context's size",
                                    value=state.kv_used / state.kv_size)
        if state.slots:  # per sequence: busy or not, and the KV positions it holds (an idle slot keeps its conversation)
            yield GaugeMetricFamily("edgevlm_slots", "sequences of the context", value=len(state.slots))
            busy = GaugeMetricFamily("edgevlm_slot_busy", "1 while the slot answers a request", labels=["slot"])
            held = GaugeMetricFamily("edgevlm_slot_kv_positions", "KV positions the slot's sequence holds",
                                     labels=["slot"])
            for slot in state.slots:
                busy.add_metric([str(slot.id)], int(slot.state != "idle"))
                held.add_metric([str(slot.id)], slot.n_past)
            yield busy
            yield held
