"""The families' video processing specs by the `kind` a bundle manifest records ("video": {"kind": ..., ...}).

A spec is a frozen dataclass with `kind`, `to_dict()` / `from_dict()`, and the unit protocol every caller (the
runtime's prompt builder, the job's context sizing, the planner) reads without knowing the family:
- `sample(total_frames, source_fps, max_frames, fps) -> indices` (the processor's frame sampling; `max_frames` and
  `fps` are the caller's --max-frames / --fps, None for the processor's own);
- `unit_name`, `frames_per_unit`: what one encoder call and one cache entry holds (SmolVLM2: a frame; Qwen2-VL /
  Qwen2.5-VL / Qwen3-VL: a temporal patch of 2 frames);
- `tokens_per_unit(height, width, tokens_per_tile, n_frames)`: decoder rows one unit gives for source frames of that
  size when n_frames are sampled (Qwen3-VL sizes frames by the whole clip's pixel budget; the others ignore it).

How a unit becomes prompt rows (SmolVLM2's per-frame images with timestamp text, Qwen's temporal patches at M-RoPE
time positions) is the runtime's one table by kind: runtimes/video_prompt.LAYOUTS."""
from __future__ import annotations

from .qwen import QwenVideoSpec
from .qwen3 import Qwen3VideoSpec
from .smolvlm import SmolVLMVideoSpec

KINDS = {SmolVLMVideoSpec.kind: SmolVLMVideoSpec, QwenVideoSpec.kind: QwenVideoSpec,
         Qwen3VideoSpec.kind: Qwen3VideoSpec}


def video_spec_from_dict(data: dict | None):
    """The spec a manifest's "video" section describes, or None (the model takes no video)."""
    if data is None:
        return None
    if not isinstance(data, dict) or data.get("kind") not in KINDS:
        raise ValueError(f"video.kind must be one of {sorted(KINDS)}, got {data!r:.80}")
    return KINDS[data["kind"]].from_dict(data)
