"""Model families: one file each, found by architecture name through one table, imported lazily. Each family file
has two halves: `describe(config, processor_config, tokenizer) -> FamilySpec` (torch-free: what the planner, the
runtime's prompt building, the mmproj writer and `inspect` read) and `load(path, config, dtype)` (the PyTorch
modules; torch is imported inside it). This package imports no torch: `load_checkpoint` does, when called."""
from __future__ import annotations

import importlib
from pathlib import Path

from ..errors import CheckpointError
from .files import read_config, read_processor_config, read_vocabulary
from .spec import FamilySpec, Vocabulary

# architecture (config.json "architectures") -> module under edgevlm.families. Adding a family: its file + a row here
# (+ a decoder_arch row when its decoder is new).
FAMILIES = {
    "LlavaForConditionalGeneration": "llava",
    "Idefics3ForConditionalGeneration": "idefics3",
    "SmolVLMForConditionalGeneration": "idefics3",  # SmolVLM2
    "InternVLForConditionalGeneration": "internvl",  # InternVL3 -hf checkpoints
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_vl",
    "Qwen3VLForConditionalGeneration": "qwen3_vl",
    "Gemma3ForConditionalGeneration": "gemma3",
    "Idefics2ForConditionalGeneration": "idefics2",
    "LlavaOnevisionForConditionalGeneration": "llava_onevision",
    "Blip2ForConditionalGeneration": "blip2",
    "InstructBlipForConditionalGeneration": "blip2",
    "PaliGemmaForConditionalGeneration": "paligemma",  # PaliGemma 2 (Gemma 2 decoder)
}
# text-only checkpoints of a family's decoder (no vision tower): refused in one line by the family that names them
TEXT_ONLY = {"Gemma3ForCausalLM": "gemma3"}


def family_name(config: dict) -> str:
    architectures = config.get("architectures") or []
    for arch in architectures:
        if arch in FAMILIES:
            return FAMILIES[arch]
        if arch in TEXT_ONLY:
            raise CheckpointError(family_module(TEXT_ONLY[arch]).text_only_refusal(arch))
    found = ", ".join(architectures) or f"model_type={config.get('model_type')!r}"
    raise CheckpointError(f"unsupported architecture {found}; supported: {', '.join(sorted(FAMILIES))}")


def family_module(name: str):
    """The family's module by its name (FAMILIES' values): describe() and load()."""
    if name not in set(FAMILIES.values()):
        raise CheckpointError(f"unknown family {name!r}; families: {', '.join(sorted(set(FAMILIES.values())))}")
    return importlib.import_module(f"{__name__}.{name}")


def describe(config: dict, processor: dict, tokenizer: Vocabulary) -> FamilySpec:
    """The FamilySpec of a checkpoint from its config.json, processor config and token table (no torch)."""
    return family_module(family_name(config)).describe(config, processor, tokenizer)


def describe_checkpoint(path: str | Path) -> FamilySpec:
    """describe() from a checkpoint folder's files; no weight is read and torch is never imported."""
    path = Path(path)
    return describe(read_config(path), read_processor_config(path), read_vocabulary(path))


def load_checkpoint(path: str | Path, dtype: str = "float32"):
    """Load an HF checkpoint folder through its family's load() on the CPU (a base.LoadedCheckpoint): float32 for the
    reference and parity checks, dtype="auto" (the stored dtype) for export."""
    path = Path(path)
    config = read_config(path)
    module = family_module(family_name(config))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor bar for small checkpoints is noise
    return module.load(path, config, dtype)


__all__ = ["FAMILIES", "FamilySpec", "Vocabulary", "describe", "describe_checkpoint", "family_module", "family_name",
           "load_checkpoint", "read_config"]
