"""The families' video processing specs by the `kind` a bundle manifest records ("video": {"kind": ..., ...}).

A spec is a frozen dataclass with `kind`, `to_dict()` / `from_dict()`, and what runtimes/video_prompt.py calls:
`sample(total_frames, source_fps, max_frames, fps) -> indices`, `prompt_text(timestamps_s, duration_s,
placeholder) -> str` (one placeholder per frame entry of the prompt), `preprocess_frame(frame) -> PreprocessedImage`
and `tokens_per_frame(tokens_per_tile)`. A family with another frame grouping (Qwen's temporal patches) adds its kind
here."""
from __future__ import annotations

from .smolvlm import SmolVLMVideoSpec

KINDS = {SmolVLMVideoSpec.kind: SmolVLMVideoSpec}


def video_spec_from_dict(data: dict | None):
    """The spec a manifest's "video" section describes, or None (the model takes no video)."""
    if data is None:
        return None
    if not isinstance(data, dict) or data.get("kind") not in KINDS:
        raise ValueError(f"video.kind must be one of {sorted(KINDS)}, got {data!r:.80}")
    return KINDS[data["kind"]].from_dict(data)
