"""A conversation about one video (`edgevlm chat --video FILE`, or Python): the video is the first turn's
attachment, and every later turn is asked with the whole conversation and the same video, as a server is. The
session's caches make that cheap: the live sequence (or the prefix cache) already holds the video's rows and the
earlier turns, so a turn prefills only its own tokens, and a unit's embedding is never encoded twice. The chosen
frames are decoded again each turn (not kept between turns: only the caches are)."""
from __future__ import annotations

from typing import Callable

from ..runtimes.requests import GenerationResult
from ..runtimes.video_prompt import VideoRequest, user_message


class VideoConversation:
    """`session`'s turns about `video` (a VideoRequest, or a path/bytes/VideoClip with the processor's sampling)."""

    def __init__(self, session, video) -> None:
        self.session = session
        # the header read once, here (a bad video fails before the first turn), not again each turn
        self.video = (video if isinstance(video, VideoRequest) else VideoRequest(video)).probed()
        self.messages: list[dict] = []

    def ask(self, prompt: str, on_text: Callable[[str], None] | None = None, **options) -> GenerationResult:
        """One turn: the first carries the video before its text; `options` as Session.prepare takes them."""
        from ..errors import BadInputError

        if not prompt.strip():
            raise BadInputError("the message is empty; type a question")
        turn = user_message(prompt) if not self.messages else self.session.user_message(prompt, 0)
        messages = self.messages + [turn]
        result = None
        for delta in self.session.respond(messages, video=self.video, **options):
            if delta.result is not None:
                result = delta.result
            elif on_text is not None:
                on_text(delta.text)
        self.messages = messages + [{"role": "assistant", "content": [{"type": "text", "text": result.text}]}]
        return result

    def reset(self) -> None:
        """Start over: the next turn is asked about the video again (the caches stay)."""
        self.messages = []
