"""The text-decoder dimensions every preset's shape states, shared by presets.py and the preset_<family>.py modules
whose shape classes extend it (kept apart so that neither imports the other)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderShape:
    """The text decoder's dimensions every preset states (its family's shape class adds the rest, with defaults)."""

    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_mlp: int
