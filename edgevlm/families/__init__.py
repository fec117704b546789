"""Model families: one file each, found by architecture name through one table, imported lazily."""
from __future__ import annotations

import importlib
from pathlib import Path

from ..errors import CheckpointError
from .base import LoadedCheckpoint, read_config

# architecture (config.json "architectures"[0]) -> module under edgevlm.families
FAMILIES = {
    "LlavaForConditionalGeneration": "llava",
    "Idefics3ForConditionalGeneration": "idefics3",
    "SmolVLMForConditionalGeneration": "idefics3",  # SmolVLM2
    "InternVLForConditionalGeneration": "internvl",  # InternVL3 -hf checkpoints
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_vl",
}


def family_name(config: dict) -> str:
    architectures = config.get("architectures") or []
    for arch in architectures:
        if arch in FAMILIES:
            return FAMILIES[arch]
    found = ", ".join(architectures) or f"model_type={config.get('model_type')!r}"
    raise CheckpointError(f"unsupported architecture {found}; supported: {', '.join(sorted(FAMILIES))}")


def load_checkpoint(path: str | Path, dtype: str = "float32") -> LoadedCheckpoint:
    """Load an HF checkpoint folder through its family adapter on the CPU: float32 for the reference and parity
    checks, dtype="auto" (the stored dtype) for export."""
    path = Path(path)
    config = read_config(path)
    module = importlib.import_module(f"{__name__}.{family_name(config)}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor bar for small checkpoints is noise
    return module.load(path, config, dtype)


__all__ = ["FAMILIES", "LoadedCheckpoint", "family_name", "load_checkpoint"]
