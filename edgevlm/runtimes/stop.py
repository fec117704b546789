"""Stop strings (OpenAI's `stop`): the streamed text is cut at the first stop string, and only a tail that could
still begin one is held back, so no piece a client sees is later taken back."""
from __future__ import annotations

from typing import Sequence


class StopFilter:
    def __init__(self, stops: Sequence[str]):
        if not stops or not all(isinstance(s, str) and s for s in stops):
            raise ValueError("stop strings must be non-empty strings")
        self.stops = list(stops)
        self.pending, self.sent, self.stopped = "", "", False

    def feed(self, piece: str) -> str:
        """The part of `piece` (with what was held back) that is certainly before any stop string."""
        if self.stopped:
            return ""
        text = self.pending + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            out = text[:min(hits)]
        else:
            keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            out, self.pending = text[:len(text) - keep], text[len(text) - keep:]
        self.sent += out
        return out

    def flush(self) -> str:
        """At the end of generation: what was held back was not a stop string after all."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        self.sent += out
        return out
