"""The session: preprocess -> encode (cached) -> prefill the prompt's segments at their positions into one sequence
(reusing what the KV already holds or a cached image prefix) -> sample and stream -> stop.

Prompt building lives in prompt.py and reuse planning in reuse.py (both pure), a prefix's stored state in
prefix_state.py; this module orchestrates and runs the generation loop. One primitive, `respond`, yields text deltas and
then the final GenerationResult; `generate`, `stream`, `chat`, `stream_conversation` and the one-at-a-time server are
built on it. It drives `generation`, the same loop as a cooperative generator that also yields its decode steps
(StepRequest) and prefill pauses, which the --parallel server answers with one batched decode for all its sequences
(one Session per sequence, `sibling`).
The record of what the decoder's KV holds (`_kv_keys`) is only ever extended after a prefill succeeded, and any
failure empties the sequence, so a later request can never reuse KV that belongs to another prompt."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Generator, Iterator, Sequence

import numpy as np

from ..errors import BadInputError
from ..positions import text_positions
from . import prompt as prompts
from . import video_prompt
from .base import Decoder, Encoder, Segment
from .cache import ByteLRU
from .detokenize import IncrementalDetokenizer
from .embeddings import SingleFlight, image_embeddings
from .encode_worker import embeddings_between
from .parked import ParkedSequences, park, unpark
from .prefix_state import restore_prefix, store_prefix
from .prompt import PreparedImage, Prompt, RuntimeSpec  # noqa: F401 - RuntimeSpec is part of this module's API
from .requests import (  # noqa: F401 - part of this module's API
    COUNTER_KEYS, PAUSE, TIMING_KEYS, Delta, GenerationResult, Pause, Request, StepRequest, _as_list,
    _check_conversation, _new_timings,
)
from .reuse import common_prefix, plan_reuse
from .sampling import SamplingConfig
from .video_prompt import VideoRequest
from .stop import StopFilter
from .video_embeddings import PreparedVideo, video_embeddings

DEFAULT_MAX_TOKENS = 64
DEFAULT_EMBED_CACHE_BYTES = 256 << 20
DEFAULT_PREFIX_CACHE_BYTES = 512 << 20


class Session:
    def __init__(
        self,
        spec: RuntimeSpec,
        encoder: Encoder,
        decoder: Decoder,
        embed_cache_bytes: int = DEFAULT_EMBED_CACHE_BYTES,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
        encoder_name: str = "",
        decoder_name: str = "",
    ):
        self.spec = spec
        self.encoder = encoder
        self.decoder = decoder
        self.encoder_name = encoder_name or encoder.name
        self.decoder_name = decoder_name or decoder.name
        self.embed_cache = ByteLRU(embed_cache_bytes)
        self.prefix_cache = ByteLRU(prefix_cache_bytes)
        self.disk_cache = None  # DiskCache: embeddings and prefix states that survive a restart (serve --cache-dir)
        self.encode_flights = SingleFlight()  # one image is never encoded twice at once
        self.encode_worker = None  # EncodeWorker: a server's encodes off the engine thread (encode_worker.py)
        self.parked = ParkedSequences(0)  # evicted conversations' states (serve --conversation-cache-mb; 0: off)
        self._kv_keys: list = []  # identity of every position the decoder holds, always true
        self._messages: list[dict] = []  # the conversation `chat` continues
        self._chat_images: list = []

    def sibling(self, decoder: Decoder) -> "Session":
        """A session on another decoder (another sequence of the same context) sharing the encoder and every cache:
        a prefix one sibling stored is restored by another instead of being computed again. Its record starts empty, so
        its sequence is emptied to match (a context's sequence may hold what an earlier session left there)."""
        other = Session(self.spec, self.encoder, decoder, 0, 0, self.encoder_name, self.decoder_name)
        other.embed_cache, other.prefix_cache, other.disk_cache = self.embed_cache, self.prefix_cache, self.disk_cache
        other.encode_flights, other.parked, other.encode_worker = self.encode_flights, self.parked, self.encode_worker
        other.forget_sequence()
        return other

    @property
    def _state_namespace(self) -> str | None:
        """What a saved KV state must have been written by to be restored here (None: states stay in memory)."""
        return self.decoder.state_signature if self.disk_cache is not None else None

    @property
    def _decoder_id(self) -> str:
        return self.decoder.artifact_id

    # ---- prompt building (prompt.py) -------------------------------------------------------------------------
    def _prepare_image(self, source, text: str | None = None) -> PreparedImage:
        """`text`: the rendered prompt, which an encoder that reads the instruction too (InstructBLIP) needs."""
        return prompts.prepare_image(self.spec, source, self.encoder.artifact_id, text)

    def render(self, messages: list[dict]) -> str:
        return prompts.render(self.spec, messages)

    def user_message(self, prompt: str, n_images: int) -> dict:
        return prompts.user_message(self.spec, prompt, n_images)

    def tokenize(self, text: str, images: list[PreparedImage]) -> Prompt:
        return prompts.tokenize(self.spec, text, images)

    # ---- prefill ---------------------------------------------------------------------------------------------
    def _embeddings(self, image: PreparedImage, timings: dict) -> np.ndarray:
        if isinstance(image, PreparedVideo):  # a video's rows: cached and encoded unit by unit
            return video_embeddings(image, self.encoder, self.embed_cache, self.disk_cache, self.encode_flights,
                                    timings)
        return image_embeddings(image, self.encoder, self.spec.preprocess, self.embed_cache, self.disk_cache,
                                self.encode_flights, timings)

    def _segments(self, prompt: Prompt, images: list[PreparedImage], start: int, stop: int, timings: dict,
                  encoded: dict[int, np.ndarray] | None = None) -> list[Segment]:
        """Segments covering prompt positions [start, stop), each with its decoder positions (`encoded`: embeddings
        already looked up, by image index)."""
        positions = prompt.positions.positions
        segments: list[Segment] = []
        pos = start
        for run_start, run_stop, idx, first_row in prompt.runs:
            if run_stop <= start or run_start >= stop:
                continue
            if pos < run_start:
                segments.append(Segment(positions[pos:run_start], token_ids=prompt.ids[pos:run_start]))
            lo, hi = max(run_start, start), min(run_stop, stop)
            rows = encoded[idx] if encoded and idx in encoded else self._embeddings(images[idx], timings)
            segments.append(Segment(positions[lo:hi], embeds=rows[first_row + lo - run_start : first_row + hi - run_start]))
            pos = hi
        if pos < stop:
            segments.append(Segment(positions[pos:stop], token_ids=prompt.ids[pos:stop]))
        return segments

    def _prefill(self, prompt: Prompt, images: list[PreparedImage], timings: dict,
                 interleave: bool = False) -> Iterator["Pause"]:
        """Bring the sequence to the whole prompt (reuse, restore, encode, prefill, snapshot); `return`s the last
        position's logits. With `interleave`, it yields PAUSE after each image encode and between the decoder's prefill
        chunks (`prefill_chunks`: the logits are the same), where a scheduler may run other work, and EncodeWait while
        an image is encoded on the session's encode worker."""
        n = len(prompt)
        namespace = self._state_namespace
        if self.parked.enabled:
            unpark(self, prompt, timings)
        plan = plan_reuse(prompt.keys, prompt.boundaries, self._kv_keys, self.decoder.n_past, self._decoder_id,
                          lambda key: key in self.prefix_cache or (namespace is not None
                                                                   and self.disk_cache.has(namespace, key)),
                          prefix_lm=self.spec.image_attention == "prefix")
        reuse, store_at = plan.reuse, plan.store_at
        if plan.restore_key is not None:
            from_disk = plan.restore_key not in self.prefix_cache  # restore_prefix brings it up from disk
            if restore_prefix(self, plan.restore_key, reuse):
                timings["prefix_cache_hits"] += 1
                timings["disk_cache_hits"] += int(from_disk)
                self._kv_keys = list(prompt.keys[:reuse])
            else:  # cold after all
                timings["prefix_cache_misses"] += 1
                reuse, store_at = 0, max((b for b in prompt.boundaries if b < n), default=None)
        elif plan.counted_miss:
            timings["prefix_cache_misses"] += 1
        if self.spec.position_scheme == "mrope" or self.spec.image_attention != "causal":
            # an image's rows share one t position, and llama.cpp removes KV by position; a bidirectional image's
            # rows each saw the whole image: keep whole images only
            reuse = prompts.whole_images(prompt, reuse)
        if not self.decoder.can_truncate(reuse):  # a sliding-window cache dropped what the cut would need: cold
            reuse, store_at = 0, max((b for b in prompt.boundaries if b < n), default=None)
        self.decoder.truncate(reuse, prompt.positions.next_after(reuse))
        self._kv_keys = self._kv_keys[:reuse]
        timings["n_reused_positions"] = reuse
        logits, start = None, reuse
        for stop in ([store_at] if store_at else []) + [n]:
            encoded = (yield from embeddings_between(self, prompt, images, start, stop, timings)) if interleave else None
            chunks = self.decoder.prefill_chunks(self._segments(prompt, images, start, stop, timings, encoded))
            while start < stop:
                t0 = time.perf_counter()
                rows = next(chunks)
                timings["prefill_ms"] += (time.perf_counter() - t0) * 1e3
                self._kv_keys.extend(prompt.keys[start:start + rows])  # only what the decoder now holds
                start += rows
                if interleave and start < stop:
                    yield PAUSE
            logits = self.decoder.logits()
            if stop == store_at:
                store_prefix(self, prompt, stop, timings)
        timings["n_prefilled_positions"] = n - reuse
        return logits

    # ---- the one generation primitive ------------------------------------------------------------------------
    def prepare(
        self,
        messages: list[dict] | None = None,
        images: Sequence = (),
        *,
        raw_text: str | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        stop: Sequence[str] | None = None,
        return_logits: bool = False,
        video: "VideoRequest | None" = None,
    ) -> "Request":
        """Check, render and tokenize a request (images decoded and hashed, not encoded): no decoder work, so a
        scheduler can pick the sequence that already holds most of the prompt before anything runs."""
        t_start = time.perf_counter()
        if max_tokens < 1:
            raise BadInputError(f"max_tokens must be >= 1, got {max_tokens}")
        config = SamplingConfig(temperature, top_k, top_p, repetition_penalty, seed)
        try:
            stop_filter = StopFilter(stop) if stop else None
        except ValueError as exc:
            raise BadInputError(f"{exc}; got {stop!r}") from None
        text = raw_text if raw_text is not None else self.render(messages or [])
        prepared = [self._prepare_image(s, text) for s in images]
        if video is not None:  # the family's layout (runtimes/video_prompt.py); the context checked before decoding
            prompt, prepared = video_prompt.prepare_video(self, text, video, prepared)
        else:
            prompt = self.tokenize(text, prepared)
        n_prompt = len(prompt)
        n_image = sum(im.n_rows_embedded for im in prepared)
        if n_prompt >= self.decoder.n_ctx:
            raise BadInputError(
                f"the prompt is {n_prompt} tokens ({n_image} of them image tokens) but the decoder context is "
                f"{self.decoder.n_ctx}; shorten the prompt, use fewer or smaller images, or raise --n-ctx"
            )
        stops = set(self.spec.stop_token_ids if stop_token_ids is None else stop_token_ids)
        return Request(prompt, prepared, config, stop_filter, stops, max_tokens, return_logits, t_start)

    def respond(self, messages: list[dict] | None = None, images: Sequence = (), **options) -> Iterator[Delta]:
        """Answer a conversation (or `raw_text`, a prompt with placeholders used as is): text deltas as tokens
        arrive, then one Delta carrying the GenerationResult. Deltas joined equal the result's text exactly.
        `stop`: strings that end the answer (not included in it; finish reason "stop"). Options: see `prepare`."""
        steps = self.generation(self.prepare(messages, images, **options))
        try:
            for item in steps:  # a StepRequest answered with None: the generation decodes its token itself
                if isinstance(item, Delta):
                    yield item
        finally:
            steps.close()  # the consumer stopped reading: the KV record is true at every yield

    def generation(self, request: "Request", interleave: bool = False) -> Generator[Any, Any, None]:
        """The generation loop as a cooperative generator: it yields text Deltas (the last carrying the result),
        and StepRequests: send back None to have it decode the token itself, or the logits of a decode that a
        scheduler ran for it (its decoder's logits_row then says where its sampler reads them). With `interleave`
        it also yields PAUSE between prefill chunks. Its decoder must not run anything else between a StepRequest's
        decode and the send."""
        prompt, config, stop_filter, stops = request.prompt, request.config, request.stop_filter, request.stops
        max_tokens, return_logits = request.max_tokens, request.return_logits
        n_image = sum(im.n_rows_embedded for im in request.images)
        timings: dict[str, Any] = {**_new_timings(), "n_image_tokens": n_image, "n_prompt_tokens": len(prompt)}
        history = prompt.ids.tolist()
        tokens: list[int] = []
        all_logits: list[np.ndarray] = []
        step_ms: list[float] = []
        finish = "length"
        detok = IncrementalDetokenizer(self.spec.tokenizer)
        t_first = None
        sampler = self.decoder.sampler(config, history)  # llama.cpp's own chain reads its logits in place
        step_logits = return_logits or sampler.needs_logits
        try:
            logits = yield from self._prefill(prompt, request.images, timings, interleave)
            position = prompt.positions.next_position
            while True:
                t0 = time.perf_counter()
                if return_logits:
                    all_logits.append(logits.copy())
                token = sampler.sample(logits, history)
                t_first = t_first or time.perf_counter()
                if token in stops:
                    finish = "stop"
                    break
                tokens.append(token)
                history.append(token)
                piece = detok.add(token)
                if stop_filter is not None:
                    piece = stop_filter.feed(piece)
                    if stop_filter.stopped:
                        step_ms.append((time.perf_counter() - t0) * 1e3)
                        finish = "stop"
                        if piece:
                            yield Delta(piece)
                        break
                if len(tokens) == max_tokens:
                    step_ms.append((time.perf_counter() - t0) * 1e3)
                    if piece:
                        yield Delta(piece)
                    break
                if self.decoder.n_past >= self.decoder.n_ctx:
                    finish = "context"
                    if piece:
                        yield Delta(piece)
                    break
                if piece:  # the text goes out before the next decode, not one step late; the consumer's time is not
                    spent = time.perf_counter() - t0  # the step's
                    yield Delta(piece)
                    t0 = time.perf_counter() - spent
                logits = yield StepRequest(token, position)
                if logits is None:  # one position per text token: the 1-D position, or an M-RoPE text token's t
                    logits = self.decoder.step(token, position, step_logits)
                self._kv_keys.append(token)
                position += 1
                step_ms.append((time.perf_counter() - t0) * 1e3)  # decode, sampling, detokenizing: not the consumer
        except GeneratorExit:  # the consumer stopped reading: the KV record is true at every yield
            raise
        except BaseException:
            self.forget_sequence()  # whatever the decoder holds now is not what the record says
            raise
        finally:
            sampler.close()
        rest = detok.finish()
        if stop_filter is not None:
            rest = stop_filter.feed(rest) + stop_filter.flush()
            finish = "stop" if stop_filter.stopped else finish  # the stop may complete in the detokenizer's tail
        if rest:
            yield Delta(rest)
        t_end = time.perf_counter()
        timings["ttft_ms"] = ((t_first or t_end) - request.t_start) * 1e3
        timings["decode_tok_s"] = 1e3 / statistics.median(step_ms) if step_ms else 0.0
        timings["n_new_tokens"] = len(tokens)
        timings["total_ms"] = (t_end - request.t_start) * 1e3
        text = detok.text if stop_filter is None else stop_filter.sent
        yield Delta("", GenerationResult(text, tokens, finish, timings, all_logits if return_logits else None))

    # ---- built on respond ------------------------------------------------------------------------------------
    def _start_conversation(self, image, prompt: str, raw: bool, video=None) -> tuple[list[dict] | None, list]:
        if not prompt.strip():
            raise BadInputError("the prompt is empty; pass a question or instruction with --prompt")
        images = _as_list(image)
        if video is not None and not raw:
            return [video_prompt.user_message(prompt)], images
        return (None if raw else [self.user_message(prompt, len(images))]), images

    def generate(self, image=None, prompt: str = "", on_text: Callable[[str], None] | None = None, *,
                 raw: bool = False, video=None, max_frames: int | None = None, video_fps: float | None = None,
                 **options) -> GenerationResult:
        """Answer one prompt about zero or more images, or about one `video` (a path, bytes, file-like or VideoClip;
        `max_frames` and `video_fps` bound its sampling; or a VideoRequest). A new conversation `chat` continues."""
        messages, images = self._start_conversation(image, prompt, raw, video)
        if video is not None:
            options["video"] = video_prompt.as_request(video, max_frames, video_fps)
        result = None
        for delta in self.respond(messages, images, raw_text=prompt if raw else None, **options):
            if delta.result is not None:
                result = delta.result
            elif on_text is not None:
                on_text(delta.text)
        # a video's frames are not kept for `chat` to continue: a follow-up asks with the video again
        self._messages = [] if raw or video is not None else messages + [self._assistant(result)]
        self._chat_images = [] if raw or video is not None else images
        return result

    def stream(self, image=None, prompt: str = "", *, raw: bool = False, **options) -> Iterator[str]:
        """Text pieces as they arrive (the same text `generate` returns); `respond` also gives the result."""
        messages, images = self._start_conversation(image, prompt, raw)
        for delta in self.respond(messages, images, raw_text=prompt if raw else None, **options):
            if delta.text:
                yield delta.text

    def stream_conversation(self, messages: list[dict], images: Sequence = (), **options) -> Iterator[Delta]:
        """A whole conversation in one request (what a server gets): user/assistant turns whose content lists
        {"type": "image"} and {"type": "text"} items, `images` in the order of those items. The live sequence and
        the prefix cache make a request that extends the previous conversation prefill only its new turns."""
        _check_conversation(messages, images)
        return self.respond(messages, list(images), **options)

    def prepare_conversation(self, messages: list[dict], images: Sequence = (), **options) -> Request:
        """`stream_conversation`'s request, checked and tokenized, for a scheduler to run with `generation`."""
        _check_conversation(messages, images)
        return self.prepare(messages, list(images), **options)

    def chat(self, prompt: str, image=None, on_text: Callable[[str], None] | None = None, **options) -> GenerationResult:
        """One turn of the conversation (the one `generate` started, or a new one); the decoder keeps the sequence,
        so a turn prefills only its new tokens."""
        if not prompt.strip():
            raise BadInputError("the message is empty; type a question")
        new_images = _as_list(image)
        messages = self._messages + [self.user_message(prompt, len(new_images))]
        images = self._chat_images + new_images
        result = None
        for delta in self.respond(messages, images, **options):
            if delta.result is not None:
                result = delta.result
            elif on_text is not None:
                on_text(delta.text)
        self._messages, self._chat_images = messages + [self._assistant(result)], images
        return result

    @staticmethod
    def _assistant(result: GenerationResult) -> dict:
        return {"role": "assistant", "content": [{"type": "text", "text": result.text}]}

    def teacher_forced_logits(self, image, prompt: str, tokens: Sequence[int]) -> list[np.ndarray]:
        """Logits before each of ``tokens`` when the decoder is fed exactly those tokens (for parity checks)."""
        sources = _as_list(image)
        text = self.render([self.user_message(prompt, len(sources))])
        images = [self._prepare_image(s, text) for s in sources]
        prompt_ids = self.tokenize(text, images)
        self.forget_sequence()
        try:
            segments = self._segments(prompt_ids, images, 0, len(prompt_ids), _new_timings())
            logits = [self.decoder.prefill(segments).copy()]
            position = prompt_ids.positions.next_position
            for token in list(tokens)[:-1]:
                segment = Segment(text_positions(self.spec.position_scheme, position, 1),
                                  token_ids=np.asarray([token], dtype=np.int32))
                logits.append(self.decoder.prefill([segment]).copy())
                position += 1
        finally:
            self.forget_sequence()
        return logits

    def reset(self) -> None:
        """Forget the conversation (the caches stay)."""
        self._messages.clear()
        self._chat_images.clear()

    @property
    def kv_positions(self) -> int:
        """Positions the live sequence holds in the decoder's KV."""
        return self.decoder.n_past

    def shared_prefix_length(self, keys: Sequence) -> int:
        """How many leading positions of a prompt (its `Prompt.keys`) the live sequence already holds: what a request
        continuing it would not prefill again (a scheduler picks the sequence with the most)."""
        if self.spec.image_attention == "prefix":  # a prefix-LM prompt is never continued in place (reuse.py)
            return 0
        return min(common_prefix(self._kv_keys, keys), self.decoder.n_past)

    def park_sequence(self) -> None:
        """Give the live sequence up (to another conversation, or to make room): its state goes to the parked tier,
        if that is on, for its conversation to come back to; then the sequence is emptied."""
        park(self)
        self.forget_sequence()

    def forget_sequence(self) -> None:
        """Empty the decoder's live sequence; the embedding and prefix caches stay."""
        self._kv_keys = []
        self.decoder.truncate(0)

    def clear_caches(self) -> None:
        """Cold start: no live sequence, no cached embeddings or prefixes."""
        self.forget_sequence()
        self.embed_cache.clear()
        self.prefix_cache.clear()
        self.parked.clear()
