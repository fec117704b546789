"""A checkpoint folder's files, read without torch: config.json, the processor config, the tokenizer's table, the
weight files and their digest. The torch half (families/base.py) and the planner both read through here."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import CheckpointError
from ..preprocess import RESAMPLE_NAMES
from .spec import Vocabulary

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def read_config(path: Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json; pass a Hugging Face checkpoint folder (save_pretrained)")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_file} is not valid JSON ({exc}); re-save the checkpoint") from None


def read_processor_config(path: Path) -> dict:
    """processor_config.json (its image_processor and its own keys), then preprocessor_config.json over it."""
    data: dict = {}
    for name in ("processor_config.json", "preprocessor_config.json"):
        file = Path(path) / name
        if file.is_file():
            try:
                loaded = json.loads(file.read_text())
            except ValueError as exc:
                raise CheckpointError(f"{file} is not valid JSON ({exc}); re-save the checkpoint") from None
            data.update(loaded.get("image_processor", loaded) if name == "processor_config.json" else loaded)
            if name == "processor_config.json":
                data.update({k: v for k, v in loaded.items() if k != "image_processor"})
    video = Path(path) / "video_preprocessor_config.json"  # the video processor's own settings, when saved apart
    if video.is_file():
        try:
            data["video_processor"] = json.loads(video.read_text())
        except ValueError as exc:
            raise CheckpointError(f"{video} is not valid JSON ({exc}); re-save the checkpoint") from None
    return data


def read_vocabulary(path: Path) -> Vocabulary:
    return Vocabulary.from_folder(Path(path))


def check_files(path: Path) -> list[Path]:
    """The weight files, after checking that weights, tokenizer and processor config are all present."""
    weights = sorted(f for pattern in WEIGHT_PATTERNS for f in path.glob(pattern))
    if not weights:
        raise CheckpointError(f"{path} has no weights (*.safetensors or pytorch_model*.bin); the checkpoint is incomplete")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{path} has no tokenizer ({' / '.join(TOKENIZER_FILES)}); save the tokenizer beside the model")
    if not any((path / name).is_file() for name in PROCESSOR_FILES):
        raise CheckpointError(f"{path} has no preprocessor_config.json; save the processor beside the model")
    return weights


def checkpoint_sha256(path: Path, weights: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in [path / "config.json", *weights]:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def resample_name(value) -> str:
    return RESAMPLE_NAMES[int(value)] if isinstance(value, int) or str(value).isdigit() else str(value).lower()


def square_side(value) -> int:
    """A square size as configs write it: 448, [448, 448] or {"height": 448, ...}."""
    if isinstance(value, dict):
        return int(value.get("height") or value.get("shortest_edge") or value.get("longest_edge"))
    return int(value[0] if isinstance(value, (list, tuple)) else value)
