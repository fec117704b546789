"""What a Session request is made of and yields: the request itself (prepared, tokenized, placed), the decode steps
and pauses its cooperative generation hands to a scheduler, the text deltas and the final result. Plain data, no
backend: the scheduler (serve/) and the Session share them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import BadInputError
from .prompt import PreparedImage, Prompt

TIMING_KEYS = ("preprocess_ms", "encode_ms", "prefill_ms", "snapshot_ms")
COUNTER_KEYS = ("n_tiles", "embed_cache_hits", "embed_cache_misses", "prefix_cache_hits", "prefix_cache_misses",
                "disk_cache_hits", "conversation_cache_hits", "conversation_cache_misses", "conversation_disk_hits",
                "conversation_disk_misses",
                # a video's units (SmolVLM2: frames; Qwen: temporal patches) encoded, and found in a cache
                "video_units_encoded", "video_units_reused")


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" | "length" | "context"
    timings: dict[str, Any]
    logits: list[np.ndarray] | None = None  # per generated token, when asked for


@dataclass(frozen=True)
class Delta:
    """One item of `respond`: a piece of text, or (last) the whole result with an empty piece."""

    text: str
    result: GenerationResult | None = None


@dataclass(frozen=True)
class StepRequest:
    """What `Session.generation` yields when it needs its next token decoded: the token, at (1-D, or an M-RoPE text
    token's t) position. The driver sends back None (decode it yourself) or the logits of a decode it ran."""

    token: int
    position: int


class Pause:
    """Yielded between prefill chunks and after an image encode: a scheduler may run other sequences' work here."""

    def __repr__(self) -> str:
        return "PAUSE"


PAUSE = Pause()


@dataclass
class Request:
    """A checked, tokenized request (Session.prepare): everything `generation` needs, nothing run yet."""

    prompt: Prompt
    images: list[PreparedImage]
    config: SamplingConfig
    stop_filter: StopFilter | None
    stops: set[int]
    max_tokens: int
    return_logits: bool
    t_start: float

    @property
    def n_positions(self) -> int:
        """Most positions the answer can take in the KV: the prompt and every token it may generate."""
        return len(self.prompt) + self.max_tokens


def _as_list(images) -> list:
    return [] if images is None else (list(images) if isinstance(images, (list, tuple)) else [images])


def _check_conversation(messages: list[dict], images: Sequence) -> None:
    n_slots = sum(item.get("type") == "image" for m in messages if isinstance(m.get("content"), list)
                  for item in m["content"])
    if n_slots != len(images):
        raise BadInputError(f"the messages have {n_slots} image items but {len(images)} images were given")
    if not messages or messages[-1].get("role") != "user":
        raise BadInputError("the conversation must end with a user message")


def _new_timings() -> dict[str, Any]:
    return {**dict.fromkeys(TIMING_KEYS, 0.0), **dict.fromkeys(COUNTER_KEYS, 0)}
