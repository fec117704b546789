"""A question about a video for a Qwen2-VL / Qwen2.5-VL session: the chat template's video item, the processor's
<|video_pad|> expansion, the video's rows as one run of temporal patches (each encoded and cached alone) at their
M-RoPE positions, then the session's own generation loop (any decoder backend: positions are passed in).

The generic path (CLI --video, the Python API's `video`, serve's video_url: runtimes/video_prompt.py) reaches this
through `TemporalPatchLayout`, its entry in video_prompt.LAYOUTS; `qwen_video_request` / `generate_video` ask about
an already sampled QwenVideo (or a clip sampled here) directly.
Prefix reuse across windows of a stream: a position's key is (unit content + time interval, row), so a re-asked clip
reuses its whole prefix; a window that slid keeps none of the old KV, because its first temporal patch changed and
every kept patch moved to another M-RoPE t (its embeddings are reused instead)."""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from ..positions import VideoSpan, plan_positions
from ..runtimes.prompt import Prompt, RuntimeSpec
from ..runtimes.requests import GenerationResult, Request
from ..runtimes.video_embeddings import PreparedVideo, unit_key
from .clip import VideoClip
from .qwen import VIDEO_TOKEN, QwenVideo, QwenVideoSpec, expand_video_tokens, prepare_video


def prepared_video(video: QwenVideo, encoder_id: str) -> PreparedVideo:
    """The session's view of a sampled Qwen video: one unit per temporal patch, encoded as a (1, h, w) grid."""
    _, h, w = video.grid
    _, rows, cols = video.merged
    keys = tuple(unit_key(k, encoder_id) for k in video.patch_keys)
    whole = hashlib.sha256(" ".join(keys + (repr(video.time_interval),)).encode()).hexdigest()
    return PreparedVideo(whole, keys, rows * cols, lambda k: (video.pixel_patches(k, k + 1), (1, h, w)), rows, cols)


def video_messages(question: str) -> list[dict]:
    """The user turn the chat template renders as <|vision_start|><|video_pad|><|vision_end|> then the text."""
    return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]


def video_prompt(session, text: str, video: QwenVideo, item: PreparedVideo) -> Prompt:
    """Token ids, per-position keys, the video's run and M-RoPE positions of rendered `text` (one <|video_pad|>)."""
    spec = session.spec
    ids = np.asarray(spec.tokenizer(expand_video_tokens(text, [video]),
                                    add_special_tokens=spec.layout.adds_special_tokens)["input_ids"], dtype=np.int32)
    where = np.flatnonzero(ids == video.spec.video_token_id)
    if len(where) != video.n_tokens or (len(where) and where[-1] - where[0] + 1 != len(where)):
        raise ValueError(f"the prompt has {len(where)} video tokens for a video of {video.n_tokens}; do not type "
                         "video tokens yourself")
    start, stop = int(where[0]), int(where[-1]) + 1
    keys: list = ids.tolist()
    per_unit = item.rows_per_unit
    for p in range(start, stop):  # where this row is and what it shows: equal keys mean equal KV
        unit, row = divmod(p - start, per_unit)
        keys[p] = (f"{item.unit_keys[unit]}@{video.time_interval!r}", row)  # (key, row): reuse.prefix_key's shape
    t, rows, cols = video.merged
    positions = plan_positions(spec.position_scheme, len(ids), [VideoSpan(start, t, rows, cols, video.time_interval)])
    return Prompt(ids, keys, [(start, stop, 0, 0)], positions, [stop])


def qwen_video_request(session, clip: VideoClip | QwenVideo, question: str, spec: QwenVideoSpec,
                       fps: float | None = None, **options) -> Request:
    """A checked request about `clip` (sampled here at `fps` or the spec's), nothing encoded yet."""
    if session.spec.position_scheme != "mrope":
        raise ValueError("Qwen video needs the M-RoPE decoder of a Qwen2-VL / Qwen2.5-VL bundle")
    video = clip if isinstance(clip, QwenVideo) else prepare_video(clip, spec, fps)
    text = session.render(video_messages(question))
    base = session.prepare(raw_text="", **options)  # options checked as for any request
    item = prepared_video(video, session.encoder.artifact_id)
    prompt = video_prompt(session, text, video, item)
    if len(prompt) >= session.decoder.n_ctx:
        raise ValueError(f"the prompt is {len(prompt)} tokens ({video.n_tokens} of them video tokens: "
                         f"{video.grid[0]} temporal patches x {item.rows_per_unit}) but the decoder context is "
                         f"{session.decoder.n_ctx}; sample fewer frames (--fps, --max-frames) or raise --n-ctx")
    _check_llama_cpp_positions(session, prompt, item)
    return dataclasses.replace(base, prompt=prompt, images=[item])


class TemporalPatchLayout:
    """runtimes/video_prompt.py's layout for kind "qwen2_vl": the chosen frames as temporal patches, one run of rows at
    M-RoPE positions (t advanced per temporal patch, scaled by seconds on Qwen2.5-VL)."""

    placeholder = VIDEO_TOKEN

    def length(self, spec: RuntimeSpec, text: str, choice) -> int:
        """Positions of rendered `text` once its one <|video_pad|> is expanded (no pixel needed)."""
        video = spec.video
        units = -(-len(choice.indices) // video.frames_per_unit)  # the last frame repeats to fill a temporal patch
        n_video = units * video.tokens_per_unit(choice.height, choice.width)
        ids = spec.tokenizer(text, add_special_tokens=spec.layout.adds_special_tokens)["input_ids"]
        return len(ids) - 1 + n_video

    def build(self, session, text: str, choice, clip: VideoClip) -> tuple[Prompt, list]:
        if session.spec.position_scheme != "mrope":
            raise ValueError("Qwen video needs the M-RoPE decoder of a Qwen2-VL / Qwen2.5-VL bundle")
        # the chosen frames at the sampled rate: a temporal patch covers temporal_patch_size / sampled_fps seconds
        sampled = VideoClip(clip.frames, clip.timestamps_s, choice.sampled_fps, choice.duration_s)
        video = prepare_video(sampled, session.spec.video, sample=False)
        item = prepared_video(video, session.encoder.artifact_id)
        prompt = video_prompt(session, text, video, item)
        _check_llama_cpp_positions(session, prompt, item)
        return prompt, [item]


def _check_llama_cpp_positions(session, prompt: Prompt, item: PreparedVideo) -> None:
    """llama.cpp takes a text batch only at the sequence's largest t + 1, but transformers 5.23 resumes the text
    after a video at pos0 + max(h', w'), below the t of a long or time-scaled video's last temporal patches (the
    original Qwen get_rope_index resumed at the largest position + 1). Refused in one line rather than failing in
    llama_decode."""
    if not type(session.decoder).__module__.startswith("edgevlm.runtimes.llamacpp"):
        return
    stop = prompt.runs[0][1]
    if stop < len(prompt) and prompt.positions.positions[stop, 0] <= prompt.positions.positions[:stop, 0].max():
        raise ValueError(f"this video's last temporal patches sit at M-RoPE t up to "
                         f"{int(prompt.positions.positions[:stop, 0].max())}, past where transformers resumes the "
                         f"text ({int(prompt.positions.positions[stop, 0])}); llama.cpp cannot take text there: use "
                         f"an mlx or torch decoder, or fewer temporal patches ({item.n_units} now)")


def generate_video(session, clip: VideoClip | QwenVideo, question: str, spec: QwenVideoSpec,
                   fps: float | None = None, **options) -> GenerationResult:
    """Answer one question about a clip; the result's timings count video_units_encoded / video_units_reused."""
    steps = session.generation(qwen_video_request(session, clip, question, spec, fps, **options))
    result = None
    try:
        for item in steps:
            if getattr(item, "result", None) is not None:
                result = item.result
    finally:
        steps.close()
    return result
