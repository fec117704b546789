"""The one place where the server touches the decoder's context: which sequence each slot answers on, and the batched
decode step. Everything else in the scheduler talks to Sessions.

`SelfStepping`: one slot on the session's own decoder (MLX, torch, or llama.cpp with --parallel 1); its generation
decodes its own tokens. `Batched`: N slots on N sequences of one llama.cpp context, one Session per sequence sharing
the caches (`Session.sibling`); their decode steps go into one llama_decode (`step_many`)."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import BadInputError


class SelfStepping:
    """One sequence whose generation decodes its own tokens: the N=1 case, for every decoder."""

    batched = False

    def __init__(self, session):
        self.sessions = [session]
        self.n_ctx = session.decoder.n_ctx

    def step(self, sessions: list, tokens: list[int], positions: list[int]) -> list[np.ndarray]:
        raise RuntimeError("a self-stepping slot decodes its own tokens; nothing batches its steps")


class Batched:
    """N sequences of one llama.cpp context (`with_sequences`), stepped together."""

    batched = True

    def __init__(self, session, n: int):
        self.context = session.decoder.with_sequences(n)
        self.n_ctx = self.context.n_ctx
        self.sessions = [session.sibling(self.context.sequence(i)) for i in range(self.context.n_seq_max)]

    def step(self, sessions: list, tokens: list[int], positions: list[int]) -> list[np.ndarray]:
        """Decode one token of each session's sequence in ONE llama_decode; the logits row of each (views, valid
        until the next decode: each session samples from its own row before anything else is decoded)."""
        self.context.step_many([s.decoder for s in sessions], tokens, positions)
        return [s.decoder.logits() for s in sessions]


def open_sequences(session, parallel: int) -> Any:
    """--parallel N > 1 opens an N-sequence context beside the session's on the same weights (with_sequences);
    only llama.cpp decoders have one, so MLX and torch refuse it rather than silently serve one at a time."""
    if parallel == 1:
        return SelfStepping(session)
    decoder = session.decoder
    if not hasattr(decoder, "with_sequences"):
        raise BadInputError(f"--parallel {parallel} needs a llama.cpp (gguf) decoder; the "
                            f"{getattr(decoder, 'name', type(decoder).__name__)} decoder serves one request at a "
                            "time (use --parallel 1)")
    return Batched(session, parallel)
