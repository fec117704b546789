"""A question about a video for a Qwen3-VL session: runtimes/video_prompt.LAYOUTS' entry for kind "qwen3_vl".

The processor writes each temporal patch as "<t seconds><|vision_start|><|video_pad|> x n<|vision_end|>", and
get_rope_index places each patch's rows like an image's ((1, h, w) grid from the current position, then the text
resumes max(h', w') later): the time lives in the text, not in M-RoPE's t. So each temporal patch is its own run and
its own one-unit PreparedVideo (encoded and cached alone, DeepStack slices in its rows as for images), with a prefix
boundary after it. A re-asked clip reuses its whole prefix; a slid window reuses the embeddings of the patches it
kept but not their KV (the first patch and every time text changed)."""
from __future__ import annotations

import numpy as np

from ..positions import ImageSpan, plan_positions
from ..runtimes.prompt import Prompt, RuntimeSpec
from ..runtimes.video_embeddings import PreparedVideo, unit_key
from .clip import VideoClip
from .qwen import VIDEO_TOKEN
from .qwen3 import Qwen3Video, patch_times, prepare_video, smart_resize, video_text


def patch_items(video: Qwen3Video, encoder_id: str) -> list[PreparedVideo]:
    """One single-unit PreparedVideo per temporal patch, encoded as a (1, h, w) grid by the image graph."""
    _, h, w = video.grid
    _, rows, cols = video.merged

    def item(k: int) -> PreparedVideo:
        key = unit_key(video.patch_keys[k], encoder_id)
        return PreparedVideo(key, (key,), rows * cols, lambda _: (video.pixel_patches(k, k + 1), (1, h, w)),
                             rows, cols)

    return [item(k) for k in range(video.grid[0])]


def video_prompt(spec: RuntimeSpec, text: str, video: Qwen3Video, items: list[PreparedVideo]) -> Prompt:
    """Token ids, per-position keys, one run per temporal patch and the M-RoPE positions of rendered `text`."""
    expanded = text.replace(VIDEO_TOKEN, video.text(), 1)
    ids = np.asarray(spec.tokenizer(expanded, add_special_tokens=spec.layout.adds_special_tokens)["input_ids"],
                     dtype=np.int32)
    per = video.tokens_per_patch
    where = np.flatnonzero(ids == video.spec.video_token_id)
    if len(where) != per * len(items):
        raise ValueError(f"the prompt has {len(where)} video tokens for a video of {per * len(items)}; do not type "
                         "video tokens yourself")
    starts = where[::per]
    if any(where[k * per + per - 1] - s + 1 != per for k, s in enumerate(starts)):
        raise ValueError("a temporal patch's video tokens are not contiguous in the prompt")
    keys: list = ids.tolist()
    _, rows, cols = video.merged
    runs, spans = [], []
    for k, start in enumerate(int(s) for s in starts):
        for row in range(per):  # (unit key, row): the reuse planner's image-row key
            keys[start + row] = (items[k].unit_keys[0], row)
        runs.append((start, start + per, k, 0))
        spans.append(ImageSpan(start, rows, cols))
    positions = plan_positions(spec.position_scheme, len(ids), spans)
    return Prompt(ids, keys, runs, positions, [stop for _, stop, _, _ in runs])


class Qwen3PatchLayout:
    """The chosen frames as temporal patches, each behind its timestamp text, placed like images."""

    placeholder = VIDEO_TOKEN

    def length(self, spec: RuntimeSpec, text: str, choice) -> int:
        """Positions of rendered `text` with the video's text in place (no pixel needed)."""
        video = spec.video
        n = len(choice.indices)
        h, w = smart_resize(n, choice.height, choice.width, video)
        times = patch_times(choice.indices, choice.source_fps, video.temporal_patch_size)
        # one pad per patch stands for its tokens (they tokenize one id each)
        short = text.replace(VIDEO_TOKEN, video_text(times, 1), 1)
        ids = spec.tokenizer(short, add_special_tokens=spec.layout.adds_special_tokens)["input_ids"]
        return len(ids) + len(times) * ((h // video.factor) * (w // video.factor) - 1)

    def build(self, session, text: str, choice, clip: VideoClip) -> tuple[Prompt, list]:
        if session.spec.position_scheme != "mrope":
            raise ValueError("Qwen3-VL video needs the M-RoPE decoder of a Qwen3-VL bundle")
        video = prepare_video(clip, session.spec.video, indices=choice.indices, source_fps=choice.source_fps)
        items = patch_items(video, session.encoder.artifact_id)
        return video_prompt(session.spec, text, video, items), items
