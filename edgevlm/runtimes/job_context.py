"""The llama.cpp context a job needs when the job is known before loading (`run`, `eval`, `bench`): its longest prompt
(template, text and image positions, counted as the session will count them) plus the tokens it may generate, rounded
up to the multiple llama.cpp pads n_ctx to. A context of 4,096 positions for a 100-position job decodes slower on a
CPU (the plain attention path reads V transposed, its rows n_ctx apart) and holds a KV cache it never fills; `serve`
keeps its --n-ctx (its conversations are not known in advance)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import BadInputError
from . import prompt as prompts

CONTEXT_MULTIPLE = 256  # llama-context.cpp pads n_ctx to 256 (the planner's budget.LLAMA_CTX_PAD)


@dataclass(frozen=True)
class Job:
    """A job's questions (each asked about `images`, or about `video`) and the most tokens any answer may take."""

    questions: tuple[str, ...]
    images: tuple = ()  # sources (paths, PIL images, arrays) every question is asked about
    max_tokens: int = 64
    video: Any = None  # a video_prompt.VideoRequest every question is asked about (its header is read, no frame)

    def __post_init__(self) -> None:
        if not self.questions:
            raise BadInputError("a job has at least one question; pass a prompt")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise BadInputError(f"max_tokens must be a whole number >= 1, got {self.max_tokens!r}; pass --max-tokens 1 "
                                "or more")

    def positions(self, spec: prompts.RuntimeSpec) -> int:
        """The KV positions its longest request fills: prompt + answer."""
        if self.video is not None:
            from .video_prompt import user_message, video_prompt_length

            video = self.video.probed()  # one header read for every question (none when the request carries it)
            return max(video_prompt_length(spec, prompts.render(spec, [user_message(q)]), video)
                       for q in self.questions) + self.max_tokens
        prepared = None
        longest = 0
        for question in self.questions:
            text = prompts.render(spec, [prompts.user_message(spec, question, len(self.images))])
            if prepared is None or spec.instruction_tokenizer is not None:  # InstructBLIP's rows depend on the text
                prepared = [prompts.prepare_image(spec, image, "", text) for image in self.images]
            longest = max(longest, len(prompts.tokenize(spec, text, prepared)))
        return longest + self.max_tokens


def round_context(positions: int, model_context: int) -> int:
    """positions rounded up to CONTEXT_MULTIPLE, at most the model's context."""
    if positions < 1:
        raise ValueError(f"a context holds at least one position, got {positions}")
    return min(-(-int(positions) // CONTEXT_MULTIPLE) * CONTEXT_MULTIPLE, int(model_context))


def job_context(job: Job, spec: prompts.RuntimeSpec, model_context: int) -> int:
    return round_context(job.positions(spec), model_context)

