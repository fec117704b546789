"""The session: preprocess -> encode (cached) -> split the prompt at image placeholders -> prefill segments in
order into one sequence (reusing what the KV already holds) -> sample and stream -> stop."""
from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from ..errors import BadInputError
from ..images import load_image
from ..layout import ImageLayout
from ..preprocess import PreprocessSpec, preprocess, tile_grid
from .base import Decoder, Encoder, Segment
from .cache import ByteLRU
from .sampling import Sampler, SamplingConfig

DEFAULT_MAX_TOKENS = 64
DEFAULT_EMBED_CACHE_BYTES = 256 << 20
DEFAULT_PREFIX_CACHE_BYTES = 512 << 20


@dataclass
class RuntimeSpec:
    """Everything the session needs besides the two backends; built from a checkpoint or a bundle manifest."""

    family: str
    tokenizer: Any
    chat_template: str | None
    preprocess: PreprocessSpec
    layout: ImageLayout
    stop_token_ids: list[int]
    context_length: int


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" | "length" | "context"
    timings: dict[str, Any]
    logits: list[np.ndarray] | None = None  # per generated token, when asked for


@dataclass
class _Image:
    rgb: Image.Image
    key: str  # content hash: decoded pixels + preprocessing + encoder artifact
    rows: int
    cols: int
    n_rows_embedded: int  # tiles * tokens per tile


@dataclass
class _Prompt:
    ids: np.ndarray  # (N,) token ids with image tokens in place
    keys: list  # per position: token id, or (image key, row)
    runs: list[tuple[int, int, int]]  # (start, stop, image index) of each image-token run
    boundaries: list[int] = field(default_factory=list)  # position right after each image's last run


def _common_prefix(a: Sequence, b: Sequence) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Session:
    def __init__(
        self,
        spec: RuntimeSpec,
        encoder: Encoder,
        decoder: Decoder,
        embed_cache_bytes: int = DEFAULT_EMBED_CACHE_BYTES,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
    ):
        self.spec = spec
        self.encoder = encoder
        self.decoder = decoder
        self.embed_cache = ByteLRU(embed_cache_bytes)
        self.prefix_cache = ByteLRU(prefix_cache_bytes)
        self._kv_keys: list = []  # identity of every position the decoder holds
        self._messages: list[dict] = []
        self._chat_images: list = []

    # ---- prompt building -------------------------------------------------------------------------------------
    def _image_key(self, rgb: Image.Image) -> str:
        digest = hashlib.sha256()
        digest.update(f"{rgb.size}".encode())
        digest.update(rgb.tobytes())
        digest.update(json.dumps(self.spec.preprocess.to_dict(), sort_keys=True).encode())
        digest.update(self.encoder.artifact_id.encode())
        return digest.hexdigest()

    def _prepare_image(self, source) -> _Image:
        rgb = load_image(source)
        rows, cols = tile_grid(rgb.size[1], rgb.size[0], self.spec.preprocess)
        n_rows = self.spec.layout.n_tiles(rows, cols) * self.spec.layout.tokens_per_tile
        return _Image(rgb, self._image_key(rgb), rows, cols, n_rows)

    def render(self, messages: list[dict]) -> str:
        """The chat template applied to messages whose content lists {"type": "image"} and {"type": "text"} items."""
        if not self.spec.chat_template:
            parts = []
            for message in messages:
                for item in message["content"]:
                    parts.append(self.spec.layout.placeholder if item["type"] == "image" else item["text"])
            return "".join(parts)
        return self.spec.tokenizer.apply_chat_template(
            messages, chat_template=self.spec.chat_template, tokenize=False, add_generation_prompt=True
        )

    def user_message(self, prompt: str, n_images: int) -> dict:
        placeholder = self.spec.layout.placeholder
        if placeholder in prompt:
            if prompt.count(placeholder) != n_images:
                raise BadInputError(
                    f"the prompt has {prompt.count(placeholder)} {placeholder} placeholders but {n_images} images were "
                    f"given; use one {placeholder} per image, or none to put the images first"
                )
            content: list[dict] = []
            pieces = prompt.split(placeholder)
            for i, piece in enumerate(pieces):
                if piece:
                    content.append({"type": "text", "text": piece})
                if i < len(pieces) - 1:
                    content.append({"type": "image"})
            return {"role": "user", "content": content}
        return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]}

    def tokenize(self, text: str, images: list[_Image]) -> _Prompt:
        layout = self.spec.layout
        pieces = text.split(layout.placeholder)
        if len(pieces) - 1 != len(images):
            raise BadInputError(
                f"the prompt text has {len(pieces) - 1} image placeholders but {len(images)} images were given"
            )
        expanded = pieces[0]
        for image, piece in zip(images, pieces[1:]):
            expanded += layout.expand(image.rows, image.cols) + piece
        ids = np.asarray(self.spec.tokenizer(expanded, add_special_tokens=True)["input_ids"], dtype=np.int32)
        is_image = ids == layout.image_token_id
        keys: list = ids.tolist()
        runs: list[tuple[int, int, int]] = []
        boundaries: list[int] = []
        row_in_image = [0] * len(images)
        image_index = 0
        pos = 0
        while pos < len(ids):
            if not is_image[pos]:
                pos += 1
                continue
            stop = pos
            while stop < len(ids) and is_image[stop]:
                stop += 1
            if image_index >= len(images):
                raise BadInputError("the prompt contains more image tokens than the images given explain")
            image = images[image_index]
            for p in range(pos, stop):
                keys[p] = (image.key, row_in_image[image_index])
                row_in_image[image_index] += 1
            runs.append((pos, stop, image_index))
            if row_in_image[image_index] == image.n_rows_embedded:
                boundaries.append(stop)
                image_index += 1
            pos = stop
        if image_index != len(images) or any(r != im.n_rows_embedded for r, im in zip(row_in_image, images)):
            raise BadInputError(
                "image tokens in the prompt do not match the images' tile layout; do not type image tokens yourself"
            )
        return _Prompt(ids, keys, runs, boundaries)

    # ---- prefill ---------------------------------------------------------------------------------------------
    def _embeddings(self, image: _Image, timings: dict) -> np.ndarray:
        cached = self.embed_cache.get(image.key)
        if cached is not None:
            timings["embed_cache_hits"] += 1
            return cached
        timings["embed_cache_misses"] += 1
        t0 = time.perf_counter()
        pre = preprocess(image.rgb, self.spec.preprocess)
        t1 = time.perf_counter()
        embeds = self.encoder.encode(pre.pixel_values)  # (tiles, T, D)
        t2 = time.perf_counter()
        timings["preprocess_ms"] += (t1 - t0) * 1e3
        timings["encode_ms"] += (t2 - t1) * 1e3
        timings["n_tiles"] += pre.pixel_values.shape[0]
        rows = np.ascontiguousarray(embeds.reshape(-1, embeds.shape[-1]), dtype=np.float32)  # (tiles*T, D)
        if rows.shape[0] != image.n_rows_embedded:
            raise RuntimeError(
                f"encoder returned {rows.shape[0]} rows for an image that needs {image.n_rows_embedded}; "
                "the encoder and the manifest's image layout disagree"
            )
        self.embed_cache.put(image.key, rows)
        return rows

    def _segments(self, prompt: _Prompt, images: list[_Image], start: int, stop: int, timings: dict) -> list[Segment]:
        """Segments covering prompt positions [start, stop)."""
        segments: list[Segment] = []
        pos = start
        image_rows: dict[int, np.ndarray] = {}
        for run_start, run_stop, idx in prompt.runs:
            if run_stop <= start or run_start >= stop:
                continue
            if pos < run_start:
                segments.append(Segment(token_ids=prompt.ids[pos:run_start]))
            if idx not in image_rows:
                image_rows[idx] = self._embeddings(images[idx], timings)
            # rows of this image consumed before run_start belong to its earlier runs
            consumed = sum(b - a for a, b, j in prompt.runs if j == idx and b <= run_start)
            lo, hi = max(run_start, start), min(run_stop, stop)
            rows = image_rows[idx][consumed + (lo - run_start) : consumed + (hi - run_start)]
            segments.append(Segment(embeds=rows))
            pos = hi
        if pos < stop:
            segments.append(Segment(token_ids=prompt.ids[pos:stop]))
        return segments

    def _prefix_key(self, keys: list, stop: int) -> str:
        digest = hashlib.sha256(self.decoder.name.encode())
        last = None
        for key in keys[:stop]:
            if isinstance(key, tuple):
                if key[0] != last:
                    digest.update(b"i" + key[0].encode())
                    last = key[0]
            else:
                digest.update(b"t%d," % key)
                last = None
        return digest.hexdigest()

    def _prefill(self, prompt: _Prompt, images: list[_Image], timings: dict) -> np.ndarray:
        n = len(prompt.ids)
        # 1. what the sequence already holds (multi-turn chat, or the same image asked again)
        reuse = min(_common_prefix(self._kv_keys, prompt.keys), self.decoder.n_past, n - 1)
        # 2. a cached prefix that ends after an image and goes further than that
        for boundary in sorted(prompt.boundaries, reverse=True):
            if boundary <= reuse or boundary >= n:
                continue
            state = self.prefix_cache.get(self._prefix_key(prompt.keys, boundary))
            if state is not None:
                self.decoder.restore(state)
                reuse = boundary
                timings["prefix_cache_hits"] += 1
                break
        else:
            if any(reuse < b < n for b in prompt.boundaries):
                timings["prefix_cache_misses"] += 1
        self.decoder.truncate(reuse)
        self._kv_keys = self._kv_keys[:reuse]
        timings["n_reused_positions"] = reuse
        # 3. prefill the rest, stopping to snapshot the state right after the last image
        store_at = max((b for b in prompt.boundaries if reuse < b < n), default=None)
        logits = None
        start = reuse
        for stop in ([store_at] if store_at else []) + [n]:
            segments = self._segments(prompt, images, start, stop, timings)
            t0 = time.perf_counter()
            logits = self.decoder.prefill(segments)
            timings["prefill_ms"] += (time.perf_counter() - t0) * 1e3
            if stop == store_at:
                self.prefix_cache.put(self._prefix_key(prompt.keys, stop), self.decoder.snapshot())
            start = stop
        timings["n_prefilled_positions"] = n - reuse
        self._kv_keys = list(prompt.keys)
        return logits

    # ---- generation ------------------------------------------------------------------------------------------
    def stream(
        self,
        image=None,
        prompt: str = "",
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        raw: bool = False,
        return_logits: bool = False,
        _messages: list[dict] | None = None,
        _images: list | None = None,
    ) -> Iterator[str]:
        """Yield text pieces as tokens arrive; the final GenerationResult is ``self.last_result``."""
        t_start = time.perf_counter()
        if _messages is None and not prompt.strip():
            raise BadInputError("the prompt is empty; pass a question or instruction with --prompt")
        if max_tokens < 1:
            raise BadInputError(f"max_tokens must be >= 1, got {max_tokens}")
        sampler = Sampler(SamplingConfig(temperature, top_k, top_p, repetition_penalty, seed))
        sources = [] if image is None else (list(image) if isinstance(image, (list, tuple)) else [image])
        if _messages is not None:
            sources = self._chat_images if _images is None else _images
        images = [self._prepare_image(s) for s in sources]
        if raw:
            text = prompt
        else:
            messages = _messages if _messages is not None else [self.user_message(prompt, len(images))]
            text = self.render(messages)
        prompt_ids = self.tokenize(text, images)
        n_prompt = len(prompt_ids.ids)
        n_image = sum(im.n_rows_embedded for im in images)
        if n_prompt >= self.decoder.n_ctx:
            raise BadInputError(
                f"the prompt is {n_prompt} tokens ({n_image} of them image tokens) but the decoder context is "
                f"{self.decoder.n_ctx}; shorten the prompt, use fewer or smaller images, or raise the context size"
            )
        timings: dict[str, Any] = dict(
            preprocess_ms=0.0, encode_ms=0.0, prefill_ms=0.0, n_tiles=0,
            embed_cache_hits=0, embed_cache_misses=0, prefix_cache_hits=0, prefix_cache_misses=0,
            n_image_tokens=n_image, n_prompt_tokens=n_prompt,
        )
        logits = self._prefill(prompt_ids, images, timings)
        stops = set(self.spec.stop_token_ids if stop_token_ids is None else stop_token_ids)
        history = prompt_ids.ids.tolist()
        tokens: list[int] = []
        all_logits: list[np.ndarray] = []
        step_times: list[float] = []
        finish = "length"
        emitted = ""
        tail_start = 0
        t_first = t_last = None
        for _ in range(max_tokens):
            if return_logits:
                all_logits.append(logits.copy())
            token = sampler.sample(logits, history)
            now = time.perf_counter()
            if t_first is not None:
                step_times.append(now - t_last)  # the whole per-token loop: decode, sampling, detokenizing
            t_first = t_first or now
            t_last = now
            if token in stops:
                finish = "stop"
                break
            tokens.append(token)
            history.append(token)
            # detokenize a short tail only (whole-text decoding each step grows with the answer); a piece that ends
            # inside a multi-byte character waits for the next token
            tail = self.spec.tokenizer.decode(tokens[tail_start:], skip_special_tokens=True)
            if tail and not tail.endswith("\ufffd"):
                yield tail
                emitted += tail
                tail_start = len(tokens)
            if len(tokens) == max_tokens:
                break
            if self.decoder.n_past >= self.decoder.n_ctx:
                finish = "context"
                break
            logits = self.decoder.prefill([Segment(token_ids=np.asarray([token], dtype=np.int32))])
            self._kv_keys.append(token)
        text_final = self.spec.tokenizer.decode(tokens, skip_special_tokens=True)
        if text_final.startswith(emitted) and len(text_final) > len(emitted):
            yield text_final[len(emitted):]
        t_end = time.perf_counter()
        timings["ttft_ms"] = ((t_first or t_end) - t_start) * 1e3
        timings["decode_tok_s"] = 1.0 / statistics.median(step_times) if step_times else 0.0
        timings["n_new_tokens"] = len(tokens)
        timings["total_ms"] = (t_end - t_start) * 1e3
        self.last_result = GenerationResult(text_final, tokens, finish, timings, all_logits if return_logits else None)

    def teacher_forced_logits(self, image, prompt: str, tokens: Sequence[int]) -> list[np.ndarray]:
        """Logits before each of ``tokens`` when the decoder is fed exactly those tokens (for parity checks)."""
        images = [self._prepare_image(s) for s in ([] if image is None else (list(image) if isinstance(image, (list, tuple)) else [image]))]
        prompt_ids = self.tokenize(self.render([self.user_message(prompt, len(images))]), images)
        timings = dict(preprocess_ms=0.0, encode_ms=0.0, prefill_ms=0.0, n_tiles=0, embed_cache_hits=0,
                       embed_cache_misses=0, prefix_cache_hits=0, prefix_cache_misses=0)
        self.decoder.truncate(0)
        self._kv_keys = []
        logits = [self.decoder.prefill(self._segments(prompt_ids, images, 0, len(prompt_ids.ids), timings)).copy()]
        for token in list(tokens)[:-1]:
            logits.append(self.decoder.prefill([Segment(token_ids=np.asarray([token], dtype=np.int32))]).copy())
        self.decoder.truncate(0)
        return logits

    def generate(self, image=None, prompt: str = "", on_text: Callable[[str], None] | None = None, **kwargs) -> GenerationResult:
        for piece in self.stream(image, prompt, **kwargs):
            if on_text is not None:
                on_text(piece)
        return self.last_result

    def stream_conversation(self, messages: list[dict], images: Sequence = (), **kwargs) -> Iterator[str]:
        """A whole conversation in one request (what a server gets): user/assistant turns whose content lists
        {"type": "image"} and {"type": "text"} items, `images` in the order of those items. The live sequence and
        the prefix cache make a request that extends the previous conversation prefill only its new turns."""
        n_slots = sum(item.get("type") == "image" for m in messages if isinstance(m.get("content"), list)
                      for item in m["content"])
        if n_slots != len(images):
            raise BadInputError(f"the messages have {n_slots} image items but {len(images)} images were given")
        if not messages or messages[-1].get("role") != "user":
            raise BadInputError("the conversation must end with a user message")
        return self.stream(_messages=messages, _images=list(images), **kwargs)

    def chat(self, prompt: str, image=None, on_text: Callable[[str], None] | None = None, **kwargs) -> GenerationResult:
        """One turn of a conversation; the decoder keeps the sequence, so a turn prefills only its new tokens."""
        if not prompt.strip():
            raise BadInputError("the message is empty; type a question")
        new_images = [] if image is None else (list(image) if isinstance(image, (list, tuple)) else [image])
        message = self.user_message(prompt, len(new_images))
        self._messages.append(message)
        self._chat_images.extend(new_images)
        try:
            result = self.generate(on_text=on_text, _messages=self._messages, **kwargs)
        except Exception:
            self._messages.pop()
            del self._chat_images[len(self._chat_images) - len(new_images):]
            raise
        self._messages.append({"role": "assistant", "content": [{"type": "text", "text": result.text}]})
        return result

    def reset(self) -> None:
        """Forget the conversation (the caches stay)."""
        self._messages.clear()
        self._chat_images.clear()

    def forget_sequence(self) -> None:
        """Empty the decoder's live sequence; the embedding and prefix caches stay (a new request in a server)."""
        self.decoder.truncate(0)
        self._kv_keys = []

    def clear_caches(self) -> None:
        """Cold start: no live sequence, no cached embeddings or prefixes."""
        self.forget_sequence()
        self.embed_cache.clear()
        self.prefix_cache.clear()
