"""The one scheduler for every decoder: one engine thread alone touches the model (llama.cpp's context is not
thread-safe), answering requests in slots, one slot per sequence (sequences.py says which). One slot is the N=1
case: its generation decodes its own tokens. With N sequences of one llama.cpp context (`--parallel N`), each tick
decodes one token of every slot that has one in ONE llama_decode, then lets every prefilling slot run one prefill
chunk, so a long image prefill delays the others by chunks, not by its whole length. Image encodes run on the
encode worker (runtimes/encode_worker.py) while the other slots keep decoding: a slot waiting for one is skipped
until its rows are there, with the decoder's threads cut to its share meanwhile. Greedy
answers do not depend on who else is served: each row of a batch is its own sequence, sampled by its own sampler.

Admission counts every request the engine holds, in a slot or waiting: up to slots + capacity (--parallel + --queue)
are taken, one more is QueueFull (a 429 at once), so a burst is never refused while slots are free but not yet
filled. Its text goes to its handler through the job's own queue, so a client that stops reading holds only its own
handler thread, and a cancelled job stops at its next token. A new request goes to the idle slot whose sequence
shares the longest prefix with its prompt (the conversation's next turn prefills only its new tokens), else to the
least recently used idle slot. All slots share one KV pool of n_ctx positions: a request is placed once its prompt
and max_tokens fit beside what the busy slots reserved, evicting idle slots' sequences (least recently used first);
until then it waits, first in line. A sequence given to another conversation, or evicted, is parked in RAM
(runtimes/parked.py) and restored when its conversation comes back."""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import EdgeVLMError
from ..runtimes.encode_worker import EncodeWait
from ..runtimes.session import Delta, StepRequest
from .metrics import EngineState, Metrics, SlotState
from .openai import ChatService

CONTINUATION_SHARE = 0.5  # a prompt continues a slot's sequence when it shares at least this part of it


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
    counted: bool = False  # holds one place of the engine's admission count until it leaves the engine
    received: float | None = None  # time.monotonic() when its handler had the request's headers
    picked: float | None = None  # time.monotonic() when the engine took it from the queue

    def stages(self, first_text: float) -> dict[str, float]:
        """Its time outside the session's own timings, ms: `receive_ms` (the handler reading and parsing the body),
        `queue_ms` (submitted until the engine took it: other requests ahead, or the engine's wake-up) and
        `first_text_ms` (submitted until its first text, or its end, reached the handler: a streaming client's TTFT
        less the network). The session's `ttft_ms` counts to the first token; text can come tokens later, e.g. a
        character split over byte tokens."""
        out = {"first_text_ms": (first_text - self.submitted) * 1e3}
        if self.received is not None:
            out["receive_ms"] = (self.submitted - self.received) * 1e3
        if self.picked is not None:
            out["queue_ms"] = (self.picked - self.submitted) * 1e3
        return out


@dataclass
class Waiting:
    """The first request in line: with batched slots, already tokenized (the slot is chosen by its prompt)."""

    job: Job
    request: Any = None  # the Session's Request; None for a self-stepping slot (its session checks it as it starts)


@dataclass
class Slot:
    """One sequence and the request it is answering (job None: idle, its KV kept for the conversation it holds)."""

    id: int
    session: Any  # a Session on sequence `id`
    batched: bool  # its decode steps go into the context's batched step; else its generation decodes them itself
    job: Job | None = None
    steps: Any = None  # the generation running the job: Deltas, and (batched) StepRequests and prefill pauses
    pending: StepRequest | None = None  # waiting for the next batched decode
    encoding: Any = None  # the Future of its image encode on the worker, while it waits for it
    reserved: int = 0  # KV positions its answer may take (prompt + max_tokens, at most n_ctx)
    last_used: int = 0
    result: Any = None

    @property
    def state(self) -> str:
        if self.job is None:
            return "idle"
        if not self.batched:
            return "busy"
        if self.encoding is not None:
            return "encode"
        return "decode" if self.pending is not None else "prefill"


class Scheduler(threading.Thread):
    def __init__(self, service: ChatService, sequences, capacity: int = 8, metrics: Metrics | None = None,
                 threads: tuple[int, int] | None = None):
        """threads: (the decoder's threads, its threads while an image encode runs on the worker); None: unchanged."""
        super().__init__(daemon=True, name="edgevlm-engine")
        self.service, self.sequences = service, sequences
        self.metrics = metrics or Metrics()
        self.metrics.watch(self.state)
        self.jobs: queue.Queue = queue.Queue()  # bounded by the admission count, not by its own size
        self.slots = [Slot(i, session, sequences.batched) for i, session in enumerate(sequences.sessions)]
        self.capacity = capacity
        self.limit = len(self.slots) + capacity  # requests held at once: answering or waiting
        self._admitted = 0
        self._admission = threading.Lock()
        self.last_error: str | None = None
        self.tick_hook: Callable[[], None] | None = None  # tests: slow the engine down to act mid-answer
        self._held: Waiting | None = None
        self._clock = 0
        self._stopping = False
        self.threads, self._threads_now = threads, threads[0] if threads else None
        self._wake = threading.Event()  # a new job, a finished encode or stop: the engine has work again

    def submit(self, job: Job) -> Job:
        """Take the job, or QueueFull when `limit` requests are already answering or waiting."""
        with self._admission:
            if self._admitted >= self.limit:
                raise QueueFull
            self._admitted += 1
            job.counted = True
        self.jobs.put_nowait(job)
        self._wake.set()
        return job

    def _retire(self, job: Job | None) -> None:
        """The job left the engine (answered, failed, cancelled): its place is free for the next request."""
        with self._admission:
            if job is not None and job.counted:
                job.counted = False
                self._admitted -= 1

    def stop(self) -> None:
        self.jobs.put(None)
        self._wake.set()

    def run(self) -> None:
        while not self._stopping:
            self._wake.clear()  # before looking: a wake-up while this tick runs is not lost
            self._admit()
            self._cancel()
            self._split_threads()
            self._step_batch()
            ran = False
            for slot in self.slots:
                if slot.job is None or slot.pending is not None:
                    continue
                if slot.encoding is not None:
                    if not slot.encoding.done():
                        continue  # the worker is encoding its image: the others decode meanwhile
                    slot.encoding = None
                ran = True
                self._advance(slot)  # one prefill chunk, or to its next StepRequest (self-stepping: to its end)
            if self.tick_hook is not None:
                self.tick_hook()
            if not ran and not any(slot.pending is not None for slot in self.slots) and not self._stopping:
                self._wake.wait(0.5)  # only encodes in flight (or a request waiting for room): nothing to decode

    def _split_threads(self) -> None:
        """The decoder runs its share of the cores while an encode is in flight, all of them otherwise."""
        if self.threads is None:
            return
        wanted = self.threads[1] if any(slot.encoding is not None for slot in self.slots) else self.threads[0]
        if wanted != self._threads_now:
            self.sequences.context.set_threads(wanted)
            self._threads_now = wanted

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
                job.picked = time.monotonic()
                self._held = self._prepare(job)
                if self._held is None:
                    continue
            if self._held.job.cancelled.is_set():
                self.metrics.cancelled.inc()
                self._retire(self._held.job)
                self._held = None
                continue
            if not self._place(self._held):
                return  # it waits for a busy slot to finish
            self._held = None

    def _prepare(self, job: Job) -> Waiting | None:
        """Batched slots: parse and tokenize (no decoder work) to choose the slot; bad input is answered here."""
        if job.cancelled.is_set():
            self.metrics.cancelled.inc()
            self._retire(job)
            return None
        if not self.sequences.batched:
            return Waiting(job)
        try:
            messages, images, options = self.service.arguments(job.body)
            return Waiting(job, self.slots[0].session.prepare_conversation(messages, images, **options))
        except EdgeVLMError as exc:
            job.events.put(("error", 400, str(exc)))
        except Exception as exc:  # noqa: BLE001 - the engine outlives any request
            self._fail(job, exc)
        self._retire(job)
        return None

    def _place(self, waiting: Waiting) -> bool:
        idle = [slot for slot in self.slots if slot.job is None]
        if not idle:
            return False
        slot, need = idle[0], 0
        if waiting.request is not None:
            keys = waiting.request.prompt.keys
            slot = self._choose(idle, keys)
            need = min(waiting.request.n_positions, self.sequences.n_ctx)
            if not self._make_room(slot, idle, need):
                return False
            held = slot.session.kv_positions
            if held and slot.session.shared_prefix_length(keys) < CONTINUATION_SHARE * held:
                slot.session.park_sequence()  # another conversation takes the slot: this one may come back
        self._clock += 1
        slot.job, slot.reserved, slot.last_used, slot.result = waiting.job, need, self._clock, None
        try:
            # a self-stepping slot runs the session's own answer loop (Session.respond over the same generation, its
            # StepRequests answered by the decoder's own step); a batched slot's generation yields them to _step_batch
            slot.steps = (self.service.complete(waiting.job.body) if waiting.request is None
                          else slot.session.generation(waiting.request, interleave=True))
        except EdgeVLMError as exc:
            waiting.job.events.put(("error", 400, str(exc)))
            self._release(slot)
        except Exception as exc:  # noqa: BLE001 - the engine outlives any request
            self._fail(waiting.job, exc)
            self._release(slot)
        return True

    def _make_room(self, slot: Slot, idle: list[Slot], need: int) -> bool:
        """Whether `need` KV positions fit beside the busy slots' reservations; idle slots' sequences are evicted,
        least recently used first, until they do (their conversations are parked, see Session.park_sequence)."""
        busy = sum(s.reserved for s in self.slots if s.job is not None)
        if busy + need > self.sequences.n_ctx:
            return False
        others = sorted((s for s in idle if s is not slot and s.session.kv_positions), key=lambda s: s.last_used)
        held = sum(s.session.kv_positions for s in others)
        for victim in others:
            if busy + held + need <= self.sequences.n_ctx:
                break
            held -= victim.session.kv_positions
            victim.session.park_sequence()
        return True

    @staticmethod
    def _choose(idle: list[Slot], keys) -> Slot:
        """The idle slot whose sequence the prompt continues (it shares at least half of what the slot holds: the
        conversation's next turn, or the same image asked again), the longest such; else an empty slot; else the
        least recently used. A chat template's first tokens, shared by every prompt, never take another
        conversation's slot while an empty one is there."""
        shared = [(s.session.shared_prefix_length(keys), s) for s in idle]
        continued = [(n, s) for n, s in shared if n > 0 and n >= CONTINUATION_SHARE * s.session.kv_positions]
        if continued:
            return max(continued, key=lambda pair: (pair[0], pair[1].last_used))[1]
        empty = [s for s in idle if s.session.kv_positions == 0]
        return (empty or sorted(idle, key=lambda s: s.last_used))[0]

    # ---- running ---------------------------------------------------------------------------------------------
    def _cancel(self) -> None:
        """A cancelled job's generation is closed where it waits (a StepRequest not yet decoded, or between prefill
        chunks): its sequence keeps exactly what its record says, and the slot is free for the next request."""
        for slot in self.slots:
            if slot.job is not None and slot.job.cancelled.is_set():
                self._drop(slot)

    def _drop(self, slot: Slot) -> None:
        slot.steps.close()
        self.metrics.cancelled.inc()
        self._release(slot)

    def _step_batch(self) -> None:
        stepping = [slot for slot in self.slots if slot.pending is not None]
        if not stepping:
            return
        try:
            rows = self.sequences.step([s.session for s in stepping], [s.pending.token for s in stepping],
                                       [s.pending.position for s in stepping])
        except Exception as exc:  # noqa: BLE001 - every sequence of the batch is in doubt: each generation forgets its own
            for slot in stepping:
                slot.pending = None
                self._advance(slot, error=exc)
            return
        self.metrics.batches.inc()
        self.metrics.batch_rows.inc(len(stepping))
        for slot, logits in zip(stepping, rows):  # each samples from its own row; nothing is decoded in between
            slot.pending = None
            self._advance(slot, logits)

    def _advance(self, slot: Slot, reply=None, error: BaseException | None = None) -> None:
        """Run the slot's generation until it waits for a batched step, pauses in its prefill, ends, or its job is
        cancelled (checked at every piece of text); its text goes to the job's handler as it comes."""
        try:
            if error is not None:
                item = slot.steps.throw(error)
            else:
                item = next(slot.steps) if reply is None else slot.steps.send(reply)
            while isinstance(item, Delta):
                if item.result is not None:
                    slot.result = item.result
                elif item.text:
                    slot.job.events.put(item.text)
                if slot.job.cancelled.is_set():  # at a token boundary: the generation's record is true here
                    self._drop(slot)
                    return
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
        if isinstance(item, EncodeWait):
            slot.encoding = item.future
            item.future.add_done_callback(lambda _: self._wake.set())

    def _release(self, slot: Slot) -> None:
        self._retire(slot.job)
        slot.job = slot.steps = slot.pending = slot.encoding = None
        slot.reserved = 0

    def _fail(self, job: Job, exc: Exception) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        job.events.put(("error", 500, self.last_error))

    # ---- for /health and /metrics (read from handler threads: plain ints, a snapshot is good enough) -------------
    def queue_depth(self) -> int:
        return self.jobs.qsize() + (self._held is not None)  # the first in line, tokenized, waits too

    def state(self) -> EngineState:
        slots = [SlotState(s.id, s.state, s.session.kv_positions) for s in self.slots]
        return EngineState(self.queue_depth(), sum(s.state != "idle" for s in slots),
                           sum(s.n_past for s in slots), self.sequences.n_ctx, slots)
