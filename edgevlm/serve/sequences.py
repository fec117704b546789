"""The one place where the server touches the decoder's context: which sequence each slot answers on, and the batched
decode step. Everything else in the scheduler talks to Sessions.

`SelfStepping`: one slot on the session's own decoder (MLX, torch, or llama.cpp with --parallel 1); its generation
decodes its own tokens. `Batched`: N slots on N sequences of one llama.cpp context, one Session per sequence sharing
the caches (`Session.sibling`); their decode steps go into one llama_decode (`step_many`)."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import BadInputError
from ..runtimes.base import BatchedContext, Decoder


class SelfStepping:
    """One sequence whose generation decodes its own tokens: the N=1 case, for every decoder."""

    batched = False

    def __init__(self, session):
        self.sessions = [session]
        self.n_ctx = session.decoder.n_ctx

    def step(self, sessions: list, tokens: list[int], positions: list[int]) -> list[np.ndarray]:
        raise RuntimeError("a self-stepping slot decodes its own tokens; nothing batches its steps")


class Batched:
    """N sequences of the llama.cpp context the session's decoder belongs to, opened once with N sequences
    (`edgevlm.load(..., n_seq=N)`), stepped together."""

    batched = True

    def __init__(self, session, context: BatchedContext, n: int):
        self.context = context
        self.n_ctx = context.n_ctx
        # slot i answers on sequence i; the session's own decoder keeps its Session (its record of the KV is the
        # only one), the others get siblings sharing the caches
        self.sessions = [session if context.sequence(i) is session.decoder else session.sibling(context.sequence(i))
                         for i in range(n)]

    def step(self, sessions: list, tokens: list[int], positions: list[int]) -> list[np.ndarray]:
        """Decode one token of each session's sequence in ONE llama_decode; the logits row of each (views, valid
        until the next decode: each session samples from its own row before anything else is decoded)."""
        self.context.step_many([s.decoder for s in sessions], tokens, positions)
        return [s.decoder.logits() for s in sessions]


def open_sequences(session, parallel: int) -> Any:
    """--parallel N > 1 runs the slots on the sequences of the context the session's decoder belongs to; only
    llama.cpp decoders have one, so MLX and torch refuse it rather than silently serve one at a time."""
    if parallel == 1:
        return SelfStepping(session)
    decoder = session.decoder
    context = decoder.context if isinstance(decoder, Decoder) else None
    if not isinstance(context, BatchedContext):
        raise BadInputError(f"--parallel {parallel} needs a llama.cpp (gguf) decoder; the "
                            f"{decoder.name if isinstance(decoder, Decoder) else type(decoder).__name__} decoder "
                            "serves one request at a time (use --parallel 1)")
    if context.n_seq < parallel:
        raise BadInputError(f"--parallel {parallel} needs a context of {parallel} sequences; the session's has "
                            f"{context.n_seq} (load it with n_seq={parallel})")
    return Batched(session, context, parallel)
