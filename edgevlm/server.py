"""An OpenAI-compatible HTTP API over a Session (`edgevlm serve`): POST /v1/chat/completions (images as data URLs,
or local paths under --allow-local-images; optional SSE streaming), GET /v1/models, /health, /metrics, and a chat
page at /. Standard library only.

One engine thread alone touches the model (llama.cpp's context is not thread-safe). `Engine` serves one request at
a time; `ParallelEngine` (--parallel N, llama.cpp) keeps N sequences in one context, one Session per slot sharing the
caches: the decode steps of all slots go into one llama_decode, a new request's prefill runs chunk by chunk between
those steps, and a conversation's next turn goes to the slot that still holds it (LRU over idle slots otherwise)."""
from __future__ import annotations

import base64
import binascii
import bisect
import hmac
import json
import queue
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import BadInputError, EdgeVLMError
from .runtimes.base import BatchedContext, Decoder

MAX_BODY_BYTES = 64 * 2**20  # a few large base64 images
MAX_COMPLETION_TOKENS = 1 << 16
MAX_PARALLEL = 64
DISCONNECT_POLL_S = 0.05  # how often a waiting handler checks that its client is still there
CONTINUATION_SHARE = 0.5  # a prompt continues a slot's sequence when it shares at least this part of it
CHAT_PAGE = Path(__file__).with_name("static") / "chat.html"


def parse_messages(body: dict, allow_local: Path | None = None) -> tuple[list[dict], list[Any]]:
    """OpenAI chat messages -> the session's messages ({"type": "image"} / {"type": "text"} items) and the images
    (decoded bytes from data URLs, or local paths) in order."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadInputError("'messages' must be a non-empty list of {role, content} objects")
    out, images = [], []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "user", "assistant"):
            raise BadInputError(f"messages[{i}].role must be system, user or assistant, got {role!r}")
        content = message.get("content")
        items: list[dict] = []
        if isinstance(content, str):
            items.append({"type": "text", "text": content})
        elif isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    items.append({"type": "text", "text": str(part.get("text", ""))})
                elif kind == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    images.append(image_source(str(url or ""), allow_local))
                    items.append({"type": "image"})
                else:
                    raise BadInputError(f"messages[{i}] has a content part of type {kind!r}; use 'text' or 'image_url'")
        else:
            raise BadInputError(f"messages[{i}].content must be a string or a list of parts")
        if role == "system":  # templates differ in system support; fold it into the first user turn's text
            items = [{"type": "text", "text": "".join(x.get("text", "") for x in items) + "\n"}]
            role = "user"
        out.append({"role": role, "content": items})
    merged: list[dict] = []
    for message in out:  # a system turn becomes the start of the user turn after it
        if merged and merged[-1]["role"] == message["role"] == "user":
            merged[-1]["content"] = merged[-1]["content"] + message["content"]
        else:
            merged.append(message)
    return merged, images


def image_source(url: str, allow_local: Path | None = None):
    """data:image/...;base64,... -> bytes. A local path (file:///path or a plain path) only under `allow_local`
    (`--allow-local-images DIR`), resolved with symlinks, so a client cannot make the server read any file the
    process can. Remote URLs are refused: an edge server should not fetch from the network on a client's behalf."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header or not payload:
            raise BadInputError("an image data URL must be base64: data:image/png;base64,...")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise BadInputError("the image data URL is not valid base64") from None
    if url.startswith(("http://", "https://")):
        raise BadInputError("remote image URLs are not fetched; send the image as a data URL (base64) or a local path")
    if allow_local is None:
        raise BadInputError("local image paths are refused by this server; send the image as a data URL (base64), "
                            "or start it with --allow-local-images DIR")
    root = Path(allow_local).resolve()
    path = Path(url.removeprefix("file://")).expanduser()
    resolved = (root / path if not path.is_absolute() else path).resolve()
    if resolved != root and root not in resolved.parents:
        raise BadInputError(f"image path {url!r} is outside the folder this server may read ({root})")
    return str(resolved)


def sampling_options(body: dict) -> dict:
    """OpenAI's request fields -> the session's sampling options; `n` > 1 and malformed `stop` are refused."""
    n = body.get("n", 1)
    if n not in (None, 1):
        raise BadInputError(f"n={n!r}: this server returns one choice per request; send n=1 (or several requests)")
    try:
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        options: dict[str, Any] = {"max_tokens": 256 if limit is None else int(limit)}
        if body.get("temperature") is not None:
            options["temperature"] = float(body["temperature"])
        if body.get("top_p") is not None:
            options["top_p"] = float(body["top_p"])
        if body.get("seed") is not None:
            options["seed"] = int(body["seed"])
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadInputError(f"max_tokens, temperature, top_p and seed must be numbers ({exc})") from None
    if not 1 <= options["max_tokens"] <= MAX_COMPLETION_TOKENS:
        raise BadInputError(f"max_tokens must be 1..{MAX_COMPLETION_TOKENS}, got {options['max_tokens']}")
    from .runtimes.sampling import SamplingConfig

    try:
        SamplingConfig(options.get("temperature", 0.0), 0, options.get("top_p", 1.0), 1.0, options.get("seed"))
    except ValueError as exc:
        raise BadInputError(f"{exc}; fix the sampling options") from None
    return options


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not 1 <= len(stop) <= 4 or not all(isinstance(x, str) and x for x in stop):
        raise BadInputError("'stop' must be a non-empty string or a list of 1-4 non-empty strings")
    return stop


class ChatService:
    """The session behind the API. Only the engine's thread calls `complete` in a server."""

    def __init__(self, session, model_name: str, allow_local_images: Path | None = None):
        self.session, self.model_name = session, model_name
        self.allow_local_images = allow_local_images

    def arguments(self, body: dict) -> tuple[list[dict], list, dict]:
        """The request body as the session's messages, images and options (bad input: BadInputError)."""
        messages, images = parse_messages(body, self.allow_local_images)
        options = sampling_options(body)
        stops = stop_strings(body)
        if stops:
            options["stop"] = stops
        return messages, images, options

    def complete(self, body: dict) -> Iterator:
        """Deltas of the answer, the last one carrying the whole GenerationResult."""
        messages, images, options = self.arguments(body)
        # the live sequence stays: a follow-up turn of the conversation it holds prefills only its new tokens; any
        # other request keeps the part it shares (system prompt, image) and the session truncates the rest
        return self.session.stream_conversation(messages, images, **options)

    def response(self, result, completion_id: str) -> dict:
        return {
            "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": self.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": finish_reason(result)}],
            "usage": usage(result), "timings": result.timings,
        }


def finish_reason(result) -> str:
    return "stop" if result.finish_reason == "stop" else "length"


def usage(result) -> dict:
    t = result.timings
    return {"prompt_tokens": t["n_prompt_tokens"], "completion_tokens": t["n_new_tokens"],
            "total_tokens": t["n_prompt_tokens"] + t["n_new_tokens"]}


class QueueFull(Exception):
    pass


@dataclass
class Job:
    """One request as the engine sees it: its events go to the handler through `events` (text pieces, then a
    ("done", result) or ("error", status, message) tuple)."""

    body: dict
    events: "queue.Queue" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)


class Metrics:
    """Counters, gauges and histograms, rendered in Prometheus' text format at /metrics."""

    TTFT_BUCKETS_MS = (50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)
    RATE_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 1000)

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[str, int] = {}  # outcome -> count
        self.cancelled = 0
        self.active = 0
        self.batches = 0  # batched decode calls (--parallel) and the rows they held: rows / batches = slots per step
        self.batch_rows = 0
        self.ttft = [0] * (len(self.TTFT_BUCKETS_MS) + 1)
        self.ttft_sum = 0.0
        self.rate = [0] * (len(self.RATE_BUCKETS) + 1)
        self.rate_sum = 0.0
        self.cache = {"prefix_cache_hits": 0, "prefix_cache_misses": 0, "embed_cache_hits": 0, "embed_cache_misses": 0}

    def count(self, outcome: str) -> None:
        with self.lock:
            self.requests[outcome] = self.requests.get(outcome, 0) + 1

    def observe(self, timings: dict) -> None:
        with self.lock:
            ttft, rate = timings.get("ttft_ms"), timings.get("decode_tok_s")
            if isinstance(ttft, (int, float)):
                self.ttft[bisect.bisect_left(self.TTFT_BUCKETS_MS, ttft)] += 1
                self.ttft_sum += ttft
            if isinstance(rate, (int, float)) and rate > 0:
                self.rate[bisect.bisect_left(self.RATE_BUCKETS, rate)] += 1
                self.rate_sum += rate
            for key in self.cache:
                value = timings.get(key)
                if isinstance(value, (int, float)):
                    self.cache[key] += int(value)

    def render(self, queue_depth: int, kv_used: int | None, kv_size: int | None, slots: list[dict] = ()) -> str:
        lines = ["# TYPE edgevlm_requests_total counter"]
        with self.lock:
            for outcome, n in sorted(self.requests.items()):
                lines.append(f'edgevlm_requests_total{{outcome="{outcome}"}} {n}')
            lines += ["# TYPE edgevlm_cancelled_total counter", f"edgevlm_cancelled_total {self.cancelled}",
                      "# TYPE edgevlm_decode_batches_total counter", f"edgevlm_decode_batches_total {self.batches}",
                      "# TYPE edgevlm_decode_batch_rows_total counter",
                      f"edgevlm_decode_batch_rows_total {self.batch_rows}",
                      "# TYPE edgevlm_queue_depth gauge", f"edgevlm_queue_depth {queue_depth}",
                      "# TYPE edgevlm_active_sequences gauge", f"edgevlm_active_sequences {self.active}"]
            for name, buckets, counts, total in (("edgevlm_ttft_ms", self.TTFT_BUCKETS_MS, self.ttft, self.ttft_sum),
                                                 ("edgevlm_decode_tok_s", self.RATE_BUCKETS, self.rate, self.rate_sum)):
                lines.append(f"# TYPE {name} histogram")
                running = 0
                for bound, n in zip((*buckets, "+Inf"), counts):
                    running += n
                    lines.append(f'{name}_bucket{{le="{bound}"}} {running}')
                lines += [f"{name}_sum {total}", f"{name}_count {running}"]
            for key, value in self.cache.items():
                lines += [f"# TYPE edgevlm_{key}_total counter", f"edgevlm_{key}_total {value}"]
            hits = self.cache["prefix_cache_hits"] + self.cache["embed_cache_hits"]
            looks = hits + self.cache["prefix_cache_misses"] + self.cache["embed_cache_misses"]
            lines += ["# TYPE edgevlm_cache_hit_ratio gauge", f"edgevlm_cache_hit_ratio {hits / looks if looks else 0.0}"]
        if kv_used is not None and kv_size:
            lines += ["# TYPE edgevlm_kv_occupancy gauge", f"edgevlm_kv_occupancy {kv_used / kv_size}"]
        if slots:  # per sequence: busy or not, and the KV positions it holds (an idle slot keeps its conversation)
            lines += ["# TYPE edgevlm_slots gauge", f"edgevlm_slots {len(slots)}", "# TYPE edgevlm_slot_busy gauge"]
            lines += [f'edgevlm_slot_busy{{slot="{s["id"]}"}} {int(s["state"] != "idle")}' for s in slots]
            lines.append("# TYPE edgevlm_slot_kv_positions gauge")
            lines += [f'edgevlm_slot_kv_positions{{slot="{s["id"]}"}} {s["n_past"]}' for s in slots]
        return "\n".join(lines) + "\n"


class _EngineThread(threading.Thread):
    """What both engines share: the bounded admission queue (a full queue is a 429 at once), the stop sentinel, and
    the 500 answer to an unexpected failure (the engine outlives any request)."""

    def __init__(self, service: ChatService, capacity: int, metrics: Metrics | None):
        super().__init__(daemon=True, name="edgevlm-engine")
        if not 1 <= capacity <= 4096:
            raise ValueError(f"queue capacity must be 1..4096, got {capacity}")
        self.service, self.metrics = service, metrics or Metrics()
        self.jobs: queue.Queue = queue.Queue(maxsize=capacity)
        self.last_error: str | None = None

    def submit(self, job: Job) -> Job:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        return job

    def stop(self) -> None:
        self.jobs.put(None)

    def _fail(self, job: Job, exc: Exception) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        job.events.put(("error", 500, self.last_error))


class Engine(_EngineThread):
    """The one thread that touches the session: jobs wait in a bounded queue and run one at a time; a job's text
    goes to its handler through the job's own queue, so a client that stops reading holds only its own handler
    thread, and a cancelled job stops at its next token."""

    def __init__(self, service: ChatService, capacity: int = 8, metrics: Metrics | None = None):
        super().__init__(service, capacity, metrics)

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                self.metrics.cancelled += 1
                continue
            self.metrics.active = 1
            try:
                self.serve(job)
            except Exception as exc:  # noqa: BLE001 - the engine outlives any request
                self._fail(job, exc)
            finally:
                self.metrics.active = 0

    def serve(self, job: Job) -> None:
        try:
            deltas = self.service.complete(job.body)
            delta = next(deltas, None)  # bad input surfaces here, before any text
        except EdgeVLMError as exc:
            job.events.put(("error", 400, str(exc)))
            return
        result = None
        try:
            while delta is not None:
                if job.cancelled.is_set():
                    self.metrics.cancelled += 1
                    return
                if delta.result is not None:
                    result = delta.result
                elif delta.text:
                    job.events.put(delta.text)
                delta = next(deltas, None)
        finally:
            deltas.close()  # a cancel ends the decode loop here, at a token boundary
        self.metrics.observe(result.timings)
        job.events.put(("done", result))

    def queue_depth(self) -> int:
        return self.jobs.qsize()

    def slot_states(self) -> list[dict]:
        decoder = self.service.session.decoder
        return [{"id": 0, "state": "busy" if self.metrics.active else "idle", "n_past": decoder.n_past}]

    def kv(self) -> tuple[int | None, int | None]:
        """KV positions in use and the context's size (for /metrics)."""
        decoder = self.service.session.decoder
        return decoder.n_past, decoder.n_ctx


@dataclass
class Slot:
    """One sequence of the shared context and the request it is answering (job None: idle, its KV kept)."""

    id: int
    session: Any  # a Session on the context's sequence `id`
    job: Job | None = None
    steps: Any = None  # the Session.generation running the job
    pending: Any = None  # its StepRequest, waiting for the next batched decode
    reserved: int = 0  # KV positions its answer may take (prompt + max_tokens, at most n_ctx)
    last_used: int = 0
    result: Any = None

    @property
    def state(self) -> str:
        return "idle" if self.job is None else ("decode" if self.pending is not None else "prefill")


class ParallelEngine(_EngineThread):
    """The one thread that touches a context of N sequences (`--parallel N`, llama.cpp): each tick decodes one token
    of every slot that has one in ONE llama_decode, then lets every prefilling slot run one prefill chunk (or one
    image encode), so a long image prefill delays the others by chunks, not by its whole length. Greedy answers do
    not depend on who else is served: each row of a batch is its own sequence, sampled by its own sampler chain.

    A new request goes to the idle slot whose sequence shares the longest prefix with its prompt (the conversation's
    next turn prefills only its new tokens), else to the least recently used idle slot. All slots share one KV pool
    of n_ctx positions: a request is placed once its prompt + max_tokens fit beside what the busy slots reserved,
    evicting idle slots' sequences (least recently used first); until then it waits, first in line."""

    def __init__(self, service: ChatService, pool: BatchedContext, n_slots: int, capacity: int = 8,
                 metrics: Metrics | None = None):
        super().__init__(service, capacity, metrics)
        self.pool = pool  # the context of the session's decoder: slot i runs its sequence i
        session = service.session
        self.slots = [Slot(i, session if pool.sequence(i) is session.decoder else session.sibling(pool.sequence(i)))
                      for i in range(n_slots)]  # one Session per sequence: its record of the KV stays the only one
        self.tick_hook: Callable[[], None] | None = None  # tests: slow the engine down to act mid-answer
        self._held: tuple[Job, Any] | None = None  # the first request in line, tokenized, waiting for a slot
        self._clock = 0
        self._stopping = False

    def run(self) -> None:
        while not self._stopping:
            self._admit()
            self._cancel()
            self._step_batch()
            for slot in self.slots:
                if slot.job is not None and slot.pending is None:
                    self._advance(slot)  # one prefill chunk, or to its first StepRequest
            self.metrics.active = sum(slot.job is not None for slot in self.slots)
            if self.tick_hook is not None:
                self.tick_hook()

    # ---- admission -------------------------------------------------------------------------------------------
    def _admit(self) -> None:
        """Place waiting requests into slots while they fit; block for one when nothing is running."""
        while not self._stopping:
            if self._held is None:
                idle = all(slot.job is None for slot in self.slots)
                try:
                    job = self.jobs.get() if idle else self.jobs.get_nowait()
                except queue.Empty:
                    return
                if job is None:
                    self._stopping = True
                    return
                self._held = self._prepare(job)
                if self._held is None:
                    continue
            if self._held[0].cancelled.is_set():
                self.metrics.cancelled += 1
                self._held = None
                continue
            if not self._place(*self._held):
                return  # it waits for a busy slot to finish
            self._held = None

    def _prepare(self, job: Job) -> tuple[Job, Any] | None:
        """Parse and tokenize (no decoder work); bad input is answered here."""
        if job.cancelled.is_set():
            self.metrics.cancelled += 1
            return None
        try:
            messages, images, options = self.service.arguments(job.body)
            return job, self.slots[0].session.prepare_conversation(messages, images, **options)
        except EdgeVLMError as exc:
            job.events.put(("error", 400, str(exc)))
        except Exception as exc:  # noqa: BLE001 - the engine outlives any request
            self._fail(job, exc)
        return None

    def _place(self, job: Job, request) -> bool:
        idle = [slot for slot in self.slots if slot.job is None]
        if not idle:
            return False
        slot = self._choose(idle, request.prompt.keys)
        need = min(request.n_positions, self.pool.n_ctx)
        busy = sum(s.reserved for s in self.slots if s.job is not None)
        others = sorted((s for s in idle if s is not slot and s.session.decoder.n_past), key=lambda s: s.last_used)
        held = sum(s.session.decoder.n_past for s in others)
        if busy + need > self.pool.n_ctx:
            return False
        for victim in others:  # least recently used first: their conversations fall back to the prefix cache
            if busy + held + need <= self.pool.n_ctx:
                break
            held -= victim.session.decoder.n_past
            victim.session.forget_sequence()
        self._clock += 1
        slot.job, slot.reserved, slot.last_used, slot.result = job, need, self._clock, None
        slot.steps = slot.session.generation(request, interleave=True)
        return True

    @staticmethod
    def _choose(idle: list[Slot], keys) -> Slot:
        """The idle slot whose sequence the prompt continues (it shares at least half of what the slot holds: the
        conversation's next turn, or the same image asked again), the longest such; else an empty slot; else the
        least recently used. A chat template's first tokens, shared by every prompt, never take another
        conversation's slot while an empty one is there."""
        from .runtimes.reuse import common_prefix

        shared = [(min(common_prefix(s.session._kv_keys, keys), s.session.decoder.n_past), s) for s in idle]
        continued = [(n, s) for n, s in shared if n > 0 and n >= CONTINUATION_SHARE * s.session.decoder.n_past]
        if continued:
            return max(continued, key=lambda pair: (pair[0], pair[1].last_used))[1]
        empty = [s for s in idle if s.session.decoder.n_past == 0]
        return (empty or sorted(idle, key=lambda s: s.last_used))[0]

    # ---- running ---------------------------------------------------------------------------------------------
    def _cancel(self) -> None:
        """A cancelled job's generation is closed where it waits (a StepRequest not yet decoded, or between prefill
        chunks): its sequence keeps exactly what its record says, and the slot is free for the next request."""
        for slot in self.slots:
            if slot.job is not None and slot.job.cancelled.is_set():
                slot.steps.close()
                self.metrics.cancelled += 1
                self._release(slot)

    def _step_batch(self) -> None:
        stepping = [slot for slot in self.slots if slot.pending is not None]
        if not stepping:
            return
        try:
            self.pool.step_many([s.session.decoder for s in stepping], [s.pending.token for s in stepping],
                                [s.pending.position for s in stepping])
        except Exception as exc:  # noqa: BLE001 - every sequence of the batch is in doubt: each generation forgets its own
            for slot in stepping:
                slot.pending = None
                self._advance(slot, error=exc)
            return
        self.metrics.batches += 1
        self.metrics.batch_rows += len(stepping)
        for slot in stepping:  # each samples from its own row before anything else is decoded
            slot.pending = None
            self._advance(slot, slot.session.decoder.logits())

    def _advance(self, slot: Slot, reply=None, error: BaseException | None = None) -> None:
        """Run the slot's generation until it waits for a batched step, pauses in its prefill, or ends; its text goes
        to the job's handler as it comes."""
        from .runtimes.session import Delta, StepRequest

        try:
            item = slot.steps.throw(error) if error is not None else slot.steps.send(reply)
            while isinstance(item, Delta):
                if item.result is not None:
                    slot.result = item.result
                elif item.text:
                    slot.job.events.put(item.text)
                item = next(slot.steps)
        except StopIteration:
            slot.result.timings["slot"] = slot.id
            self.metrics.observe(slot.result.timings)
            slot.job.events.put(("done", slot.result))
            self._release(slot)
            return
        except EdgeVLMError as exc:
            slot.job.events.put(("error", 400, str(exc)))
            self._release(slot)
            return
        except Exception as exc:  # noqa: BLE001 - the engine outlives any request
            self._fail(slot.job, exc)
            self._release(slot)
            return
        slot.pending = item if isinstance(item, StepRequest) else None

    def _release(self, slot: Slot) -> None:
        slot.job = slot.steps = slot.pending = None
        slot.reserved = 0

    # ---- for /health and /metrics (read from handler threads: plain ints, a snapshot is good enough) -------------
    def queue_depth(self) -> int:
        return self.jobs.qsize() + (self._held is not None)  # the first in line, tokenized, waits too

    def slot_states(self) -> list[dict]:
        return [{"id": s.id, "state": s.state, "n_past": s.session.decoder.n_past} for s in self.slots]

    def kv(self) -> tuple[int | None, int | None]:
        return sum(s.session.decoder.n_past for s in self.slots), self.pool.n_ctx


def make_handler(service: ChatService, engine: Engine, options: "ServerOptions"):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = options.socket_timeout_s  # a client that stalls sending or reading loses its connection, not ours

        def log_message(self, format, *args):  # quiet: the CLI prints one line per request itself
            pass

        def _send(self, status: int, data: bytes, content_type: str, headers: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            if status >= 400 and status != 404:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)

        def _json(self, status: int, payload: dict, headers: dict | None = None) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json", headers)

        def _error(self, status: int, message: str, kind: str = "invalid_request_error", headers=None) -> None:
            engine.metrics.count(str(status))
            self._json(status, {"error": {"message": message, "type": kind, "code": status}}, headers)

        def _error_event(self, event: tuple) -> None:
            """An engine's ("error", status, message) as the answer, before any header went out."""
            _, status, message = event
            self._error(status, message, "server_error" if status >= 500 else "invalid_request_error")

        def _authorized(self) -> bool:
            if not options.api_key:
                return True
            given = self.headers.get("Authorization", "")
            if hmac.compare_digest(given.encode(), f"Bearer {options.api_key}".encode()):
                return True
            self._error(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "authentication_error")
            return False

        def do_GET(self):
            path = self.path.split("?", 1)[0]
            if path in ("/", "/index.html"):  # the chat page: one self-contained file, no CDN
                self._send(200, CHAT_PAGE.read_bytes(), "text/html; charset=utf-8", {
                    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                                               "style-src 'unsafe-inline'; script-src 'unsafe-inline'"})
            elif path == "/health":
                alive = engine.is_alive()
                self._json(200 if alive else 503, {"status": "ok" if alive else "engine stopped",
                                                   "queue_depth": engine.queue_depth(),
                                                   "active_sequences": engine.metrics.active,
                                                   "slots": engine.slot_states(),
                                                   **({"last_error": engine.last_error} if engine.last_error else {})})
            elif path == "/metrics":
                text = engine.metrics.render(engine.queue_depth(), *engine.kv(), engine.slot_states())
                self._send(200, text.encode(), "text/plain; version=0.0.4")
            elif path == "/v1/models":
                if self._authorized():
                    self._json(200, {"object": "list", "data": [{"id": service.model_name, "object": "model",
                                                                 "owned_by": "edgevlm"}]})
            else:
                self._error(404, f"no route {self.path}; try POST /v1/chat/completions", "not_found")

        def _read_body(self) -> dict | None:
            raw_length = self.headers.get("Content-Length")
            if raw_length is None:
                self._error(411, "a Content-Length header is required")
                return None
            if not raw_length.strip().isdigit():
                self._error(400, f"Content-Length must be a non-negative integer, got {raw_length[:40]!r}")
                return None
            length = int(raw_length)
            if length > MAX_BODY_BYTES:
                self._error(413, f"the request body is {length} bytes; the limit is {MAX_BODY_BYTES}")
                return None
            try:
                raw = self.rfile.read(length)
            except (TimeoutError, OSError):
                self._error(408, f"the request body did not arrive within {options.socket_timeout_s:.0f} s")
                return None
            if len(raw) < length:
                self._error(400, f"the request body ended after {len(raw)} of {length} bytes")
                return None
            try:
                body = json.loads(raw or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("not an object")
            except (ValueError, UnicodeDecodeError) as exc:
                self._error(400, f"the request body is not a JSON object ({exc})")
                return None
            return body

        def do_POST(self):
            if self.path != "/v1/chat/completions":
                self._error(404, f"no route {self.path}; try POST /v1/chat/completions", "not_found")
                return
            if not self._authorized():
                return
            body = self._read_body()
            if body is None:
                return
            stream_options = body.get("stream_options")
            if stream_options is not None and not isinstance(stream_options, dict):
                self._error(400, "'stream_options' must be an object")
                return
            try:
                job = engine.submit(Job(body))
            except QueueFull:
                self._error(429, f"the server is busy ({engine.jobs.maxsize} requests waiting); retry shortly",
                            "rate_limit_error", {"Retry-After": "1"})
                return
            completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
            try:
                if body.get("stream"):
                    self._stream(job, completion_id, bool((stream_options or {}).get("include_usage")))
                else:
                    self._whole(job, completion_id)
            except (BrokenPipeError, ConnectionResetError, TimeoutError, OSError):
                job.cancelled.set()  # the client left or stopped reading: free the engine at its next token
                engine.metrics.count("disconnected")
                self.close_connection = True

        def _next(self, job: Job):
            """The job's next event; a client that closed its connection meanwhile cancels it (raises
            ConnectionResetError), noticed within DISCONNECT_POLL_S even when no text is being written to it."""
            deadline = job.submitted + options.request_timeout_s
            while True:
                if self._client_gone():
                    job.cancelled.set()
                    raise ConnectionResetError("the client closed the connection")
                left = deadline - time.monotonic()
                try:
                    return job.events.get(timeout=max(0.0, min(left, DISCONNECT_POLL_S)))
                except queue.Empty:
                    if left <= DISCONNECT_POLL_S:
                        job.cancelled.set()
                        return ("error", 504, f"the request took longer than {options.request_timeout_s:.0f} s "
                                              "(--request-timeout); it was cancelled")

        def _client_gone(self) -> bool:
            """The peer closed its side: the socket reads as end-of-file (a pipelined next request is not that)."""
            try:
                readable, _, _ = select.select([self.connection], [], [], 0)
                return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
            except (OSError, ValueError):
                return True

        def _whole(self, job: Job, completion_id: str) -> None:
            while True:
                event = self._next(job)
                if isinstance(event, tuple):
                    break
            if event[0] == "error":
                self._error_event(event)
                return
            engine.metrics.count("200")
            self._json(200, service.response(event[1], completion_id))

        def _stream(self, job: Job, completion_id: str, include_usage: bool) -> None:
            # the first event is awaited before the headers go out, so bad input still gets a plain 4xx
            event = self._next(job)
            if isinstance(event, tuple) and event[0] == "error":
                self._error_event(event)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True

            def send(chunk: dict) -> None:
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()

            def event_chunk(delta: dict | None, finish: str | None = None) -> dict:
                """A chunk with one choice carrying `delta`; with None, a chunk without choices (the usage chunk)."""
                choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
                return {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
                        "model": service.model_name, "choices": choices}

            send(event_chunk({"role": "assistant"}))
            while not isinstance(event, tuple):
                send(event_chunk({"content": event}))
                event = self._next(job)
            if event[0] == "error":  # headers are out: report in the stream
                send({"error": {"message": event[2], "type": "server_error", "code": event[1]}})
                engine.metrics.count(str(event[1]))
            else:
                result = event[1]
                send({**event_chunk({}, finish_reason(result)), "timings": result.timings})  # TTFT, rates, cache hits
                if include_usage:
                    send({**event_chunk(None), "usage": usage(result)})
                engine.metrics.count("200")
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

    return Handler


@dataclass(frozen=True)
class ServerOptions:
    capacity: int = 8  # requests waiting for the engine; more get 429 at once
    request_timeout_s: float = 300.0
    socket_timeout_s: float = 30.0
    api_key: str | None = None
    allow_local_images: str | None = None
    max_connections: int = 64
    cache_dir: str | None = None  # the disk tier of the embedding and prefix caches (survives restarts)
    cache_dir_bytes: int = 2 << 30
    parallel: int = 1  # sequences decoded together (llama.cpp decoders only); 1 = the one-at-a-time Engine

    def __post_init__(self) -> None:
        if not 1 <= self.parallel <= MAX_PARALLEL:
            raise BadInputError(f"--parallel must be 1..{MAX_PARALLEL}, got {self.parallel}")
        if not 1 <= self.capacity <= 4096:
            raise BadInputError(f"--queue must be 1..4096, got {self.capacity}")
        for name in ("request_timeout_s", "socket_timeout_s"):
            value = getattr(self, name)
            if not 0.1 <= value <= 86400:  # NaN fails too
                raise BadInputError(f"{name.replace('_s', '').replace('_', '-')} must be 0.1..86400 seconds, got {value}")
        if not 1 <= self.max_connections <= 65536:
            raise BadInputError(f"--max-connections must be 1..65536, got {self.max_connections}")
        if self.allow_local_images is not None and not Path(self.allow_local_images).is_dir():
            raise BadInputError(f"--allow-local-images {self.allow_local_images}: not a folder")
        if not 0 <= self.cache_dir_bytes <= 1 << 50:
            raise BadInputError(f"--cache-dir-mb must be 0..{1 << 30}, got {self.cache_dir_bytes >> 20}")
        if self.cache_dir is not None and Path(self.cache_dir).exists() and not Path(self.cache_dir).is_dir():
            raise BadInputError(f"--cache-dir {self.cache_dir}: exists and is not a folder")
        if self.api_key is not None and not self.api_key.strip():
            raise BadInputError("--api-key is empty")


class EdgeServer(ThreadingHTTPServer):
    """A thread per connection, at most `max_connections` at once (one more gets a 503 and is closed); `close`
    stops the engine too."""

    daemon_threads = True
    # the listen backlog: socketserver's default of 5 left a burst of clients beyond it waiting on SYN retries (1 s,
    # 3 s, ...) and, now and then, reset; the kernel caps it at net.core.somaxconn
    request_queue_size = 1024

    def __init__(self, address, handler, engine: Engine, max_connections: int):
        super().__init__(address, handler)
        self.engine = engine
        self.slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            body = b'{"error": {"message": "too many connections; retry shortly", "type": "rate_limit_error", "code": 503}}'
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                                b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def server_close(self):
        super().server_close()
        self.engine.stop()


def make_server(session, model_name: str, host: str = "127.0.0.1", port: int = 8000,
                options: ServerOptions | None = None) -> EdgeServer:
    options = options or ServerOptions()
    allow = Path(options.allow_local_images) if options.allow_local_images else None
    if options.cache_dir:
        from .runtimes.disk_cache import DiskCache

        session.disk_cache = DiskCache(options.cache_dir, options.cache_dir_bytes)
    service = ChatService(session, model_name, allow)
    engine = make_engine(service, options)
    engine.start()
    return EdgeServer((host, port), make_handler(service, engine, options), engine, options.max_connections)


def make_engine(service: ChatService, options: ServerOptions) -> Engine | ParallelEngine:
    """--parallel N > 1 runs the slots on the sequences of the context the session's decoder belongs to, opened once
    with N sequences (`edgevlm.load(..., n_seq=N)`); only llama.cpp decoders have one, so MLX and torch refuse it
    rather than silently serve one at a time."""
    if options.parallel == 1:
        return Engine(service, options.capacity)
    decoder = service.session.decoder
    context = decoder.context if isinstance(decoder, Decoder) else None
    if not isinstance(context, BatchedContext):
        raise BadInputError(f"--parallel {options.parallel} needs a llama.cpp (gguf) decoder; the "
                            f"{decoder.name if isinstance(decoder, Decoder) else type(decoder).__name__} decoder "
                            "serves one request at a time (use --parallel 1)")
    if context.n_seq < options.parallel:
        raise BadInputError(f"--parallel {options.parallel} needs a context of {options.parallel} sequences; the "
                            f"session's has {context.n_seq} (load it with n_seq={options.parallel})")
    return ParallelEngine(service, context, options.parallel, options.capacity)
