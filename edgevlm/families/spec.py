"""What a family says about a checkpoint without loading it: `FamilySpec`, built by each family's torch-free
`describe(config, processor_config, tokenizer)` from config.json, the processor config and the tokenizer's table.
The planner, the runtime's prompt building (through the manifest or a loaded checkpoint), the mmproj writer and
`inspect` all read this one description; nothing restates it. Leaf module: no torch, no transformers."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..decoder_arch import ARCHITECTURES
from ..errors import CheckpointError
from ..layout import ImageLayout
from ..preprocess import PreprocessSpec, tile_grid

# How the decoder attends inside an image's block of positions (a property of the prompt block, carried like
# positions): every current family is causal; Gemma 3 images are bidirectional, PaliGemma's prefix is.
ATTENTION_MODES = ("causal", "bidirectional", "prefix")
# the llama.cpp the mmproj writer's files are made for and tested with (its refusals name it)
PINNED_LLAMA_CPP = "llama.cpp 0c1e570 (llama-cpp-python 0.3.36)"
# tokenizer_config.json keys a family may read (InternVL's image delimiters)
TOKENIZER_OPTIONS = ("start_image_token", "end_image_token", "context_image_token")


@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer's token table, torch-free: text -> id (the model's vocabulary and its added tokens) and the
    tokenizer_config.json options families read. Empty when the checkpoint has no tokenizer.json (the planner then
    takes each family's usual token texts)."""

    ids: Mapping[str, int]
    options: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_texts", {int(i): t for t, i in self.ids.items()})

    @property
    def known(self) -> bool:
        return bool(self.ids)

    def id_of(self, text: str) -> int | None:
        value = self.ids.get(text)
        return None if value is None else int(value)

    def text_of(self, token_id: int) -> str | None:
        return self._texts.get(int(token_id))

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "Vocabulary":
        """From a loaded transformers (or edgevlm runtime) tokenizer: its full vocabulary and image-token options."""
        options = {k: v for k in TOKENIZER_OPTIONS if isinstance(v := getattr(tokenizer, k, None), str)}
        return cls(dict(tokenizer.get_vocab()), options)

    @classmethod
    def from_folder(cls, path: Path) -> "Vocabulary":
        """From tokenizer.json (model vocabulary + added tokens) and tokenizer_config.json, as the files say."""
        data = _read_json(Path(path) / "tokenizer.json")
        vocab = (data.get("model") or {}).get("vocab") or {}
        ids: dict[str, int] = {}
        if isinstance(vocab, dict):  # BPE / WordPiece / WordLevel
            ids.update({str(k): int(v) for k, v in vocab.items()})
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...] in id order
            ids.update({str(entry[0]): i for i, entry in enumerate(vocab)})
        ids.update({t["content"]: int(t["id"]) for t in data.get("added_tokens", [])})
        config = _read_json(Path(path) / "tokenizer_config.json")
        extra = config.get("extra_special_tokens") if isinstance(config.get("extra_special_tokens"), dict) else {}
        options = {k: v for k in TOKENIZER_OPTIONS if isinstance(v := config.get(k) or extra.get(k), str)}
        return cls(ids, options)


@dataclass(frozen=True)
class VisionShapes:
    """The vision tower + projector as the config states them, per encoder input (a tile; for a native-resolution
    tower, one merge block: its sequence and rows scale with the image)."""

    image_size: int  # the tower's input side (a tile)
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp: int  # the MLP's hidden width
    sequence: int  # positions through the tower per tile (patches, plus CLS where the tower has one)
    tokens_per_tile: int  # embedding rows per tile after the projector
    projector_prefixes: tuple[str, ...]  # state-dict key fragments of the projector (the rest is the tower)
    gated: bool = False  # a SwiGLU MLP
    merge_size: int = 1  # native resolution: merge x merge patches become one image token

    def __post_init__(self) -> None:
        numbers = {"image_size": self.image_size, "patch_size": self.patch_size, "width": self.width,
                   "layers": self.layers, "heads": self.heads, "mlp": self.mlp, "sequence": self.sequence,
                   "tokens_per_tile": self.tokens_per_tile, "merge_size": self.merge_size}
        bad = [f"{k}={v!r}" for k, v in numbers.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
        if bad:
            raise CheckpointError(f"vision shapes need positive integers: {', '.join(bad)}; the config.json is damaged")
        if not self.projector_prefixes:
            raise ValueError("a vision description names its projector's tensors (projector_prefixes)")

    @classmethod
    def of_tower(cls, tower: Mapping[str, Any], image: int, patch: int, sequence: int, tokens_per_tile: int,
                 projector_prefixes: tuple[str, ...]) -> VisionShapes:
        """A ViT tower config's (hidden_size, num_hidden_layers, num_attention_heads, intermediate_size) as the
        description's width, layers, heads and MLP width; the family says what a tile's sequence and rows are."""
        return cls(image, patch, int(tower["hidden_size"]), int(tower["num_hidden_layers"]),
                   int(tower["num_attention_heads"]), int(tower["intermediate_size"]), sequence, tokens_per_tile,
                   projector_prefixes)


@dataclass(frozen=True)
class InstructionInput:
    """The encoder also reads the prompt (InstructBLIP's Q-Former): the rendered prompt, image placeholders removed,
    tokenized by the tokenizer in `tokenizer` (a folder of the checkpoint, shipped in the bundle) into at most
    `max_tokens` ids. Its ids are part of the image's identity (cache keys)."""

    tokenizer: str  # folder (tokenizer.json inside) relative to the checkpoint / bundle
    max_tokens: int  # the Q-Former's position table

    def __post_init__(self) -> None:
        if not self.tokenizer or not isinstance(self.max_tokens, int) or self.max_tokens < 2:
            raise CheckpointError(f"an instruction input needs a tokenizer folder and max_tokens >= 2, got {self}")


@dataclass(frozen=True)
class FamilySpec:
    family: str  # edgevlm.families module and the manifest's family
    architecture: str  # the config.json architecture it was described from
    preprocess: PreprocessSpec
    layout: ImageLayout
    vision: VisionShapes
    decoder_architecture: str  # the decoder_arch row
    mmproj_projector: str | None  # llama.cpp clip.cpp projector type of the mmproj writer, or None ...
    mmproj_refusal: str | None  # ... and then why no mmproj can be written (one line, says what to do instead)
    stop_tokens: tuple[str, ...] = ()  # texts that end a turn besides the configs' eos ids (when in the vocabulary)
    image_attention: str = "causal"  # ATTENTION_MODES: how the decoder attends inside an image's block
    mrope_section: tuple[int, ...] | None = None  # M-RoPE: rotary pairs per position axis (t, row, col)
    # DeepStack (Qwen3-VL): an image row carries 1 + k slices of the decoder's width; slice i is added to the
    # hidden states after decoder layer i - 1 at the image's positions
    deepstack_layers: int = 0
    instruction: InstructionInput | None = None  # the encoder reads the prompt too (InstructBLIP)
    video: Any = None  # the family's video processing (edgevlm.video.kinds); None: no video input

    def __post_init__(self) -> None:
        if not isinstance(self.deepstack_layers, int) or self.deepstack_layers < 0:
            raise CheckpointError(f"deepstack_layers must be a count >= 0, got {self.deepstack_layers!r}")
        if self.decoder_architecture not in ARCHITECTURES:
            raise CheckpointError(f"decoder architecture {self.decoder_architecture!r} has no row in decoder_arch "
                                  f"(rows: {', '.join(ARCHITECTURES)})")
        if self.image_attention not in ATTENTION_MODES:
            raise ValueError(f"image attention {self.image_attention!r} is not one of {ATTENTION_MODES}")
        if (self.mmproj_projector is None) == (self.mmproj_refusal is None):
            raise ValueError("a family spec names either its mmproj projector type or why there is none, not both")
        if self.layout.tokens_per_tile != self.vision.tokens_per_tile:
            raise CheckpointError(f"the image layout has {self.layout.tokens_per_tile} tokens per tile but the vision "
                                  f"tower makes {self.vision.tokens_per_tile}; the checkpoint's files do not belong "
                                  "together")
        grid = self.layout.kind == "grid"
        if grid != (self.preprocess.resize_rule == "qwen2vl"):
            raise ValueError(f"layout {self.layout.kind!r} and resize rule {self.preprocess.resize_rule!r} disagree "
                             "on native resolution")
        if grid and (self.preprocess.patch_size, self.preprocess.merge_size) != (self.vision.patch_size,
                                                                                  self.vision.merge_size):
            raise CheckpointError(f"preprocessor_config.json says patch {self.preprocess.patch_size} / merge "
                                  f"{self.preprocess.merge_size} but the vision tower uses {self.vision.patch_size} / "
                                  f"{self.vision.merge_size}; the files do not belong together")
        if self.mrope_section is not None:
            object.__setattr__(self, "mrope_section", tuple(int(v) for v in self.mrope_section))

    @property
    def tokens_per_tile(self) -> int:
        return self.layout.tokens_per_tile

    @property
    def position_scheme(self) -> str:
        return ARCHITECTURES[self.decoder_architecture].position_schemes[0]

    def image_tokens(self, width: int, height: int) -> int:
        """Image-token rows (embedding rows the encoder gives) of one width x height image: its tile grid under the
        preprocessing, times tokens per tile (a native-resolution image: its merged patches)."""
        if self.preprocess.resize_rule == "anyres":
            return self.preprocess.anyres_rows(height, width)
        rows, cols = tile_grid(height, width, self.preprocess)
        return self.layout.n_tiles(rows, cols) * self.layout.tokens_per_tile

    def stop_token_ids(self, vocabulary: Vocabulary) -> list[int]:
        return sorted(i for t in self.stop_tokens if (i := vocabulary.id_of(t)) is not None)

    def summary(self) -> dict:
        """For `inspect`: the description as plain values."""
        from dataclasses import asdict

        return {"family": self.family, "architecture": self.architecture, "preprocess": self.preprocess.to_dict(),
                "image_layout": self.layout.to_dict(), "vision": asdict(self.vision),
                "decoder_architecture": self.decoder_architecture, "image_attention": self.image_attention,
                "mmproj_projector": self.mmproj_projector, "mmproj_refusal": self.mmproj_refusal,
                "stop_tokens": list(self.stop_tokens),
                "mrope_section": list(self.mrope_section) if self.mrope_section else None,
                "deepstack_layers": self.deepstack_layers,
                "instruction": asdict(self.instruction) if self.instruction else None}


def tower_config(config: dict, defaults: Mapping[str, Any]) -> dict:
    """config.json's vision_config over the family's defaults, which stand for keys it omits or stores as null."""
    return {**defaults, **{k: v for k, v in (config.get("vision_config") or {}).items() if v is not None}}


def mlp_width_refusal(projector_type: str, width: int, mlp: int) -> str | None:
    """clip.cpp's loader (load_tensors, is_ffn_swapped) takes a tower whose ffn_down is as wide as the tower for a
    legacy file with ffn_up/ffn_down swapped, and swaps them back, for the mlp, idefics3, qwen2vl, qwen2.5vl and
    gemma3 projector types among others: such a tower cannot be written for it."""
    if width != mlp:
        return None
    return (f"the vision tower's MLP is as wide as the tower ({width}); llama.cpp reads such {projector_type} mmproj "
            "files as legacy ones with ffn_up/ffn_down swapped and swaps them back")


def text_config(config: dict) -> dict:
    """The decoder's config: text_config, or for a Qwen2-VL config.json in the Hub's older layout (the text keys at the
    top level, model_type "qwen2_vl") those keys, typed as transformers 5 types the nested one ("qwen2_vl_text")."""
    if config.get("text_config"):
        return config["text_config"]
    if config.get("model_type") in ("qwen2_vl", "qwen2_5_vl"):
        return {**config, "model_type": config["model_type"] + "_text"}
    return {}


def usable_context(text: dict, row: str, max_positions: int) -> int:
    """Positions a decoder answers as its checkpoint does: a sliding window on a row that runs every layer globally
    (Mistral on the llama row) caps the context where the window would start to matter."""
    from ..decoder_arch import architecture

    window = text.get("sliding_window") if text.get("use_sliding_window", True) else None
    if window and not architecture(row).swa_global_every:  # rows with local layers keep their window (SWA cache)
        return min(int(max_positions), int(window))
    return int(max_positions)


def decoder_row(config: dict, default_model_type: str = "llama") -> str:
    from ..decoder_arch import architecture_for_model_type

    return architecture_for_model_type(text_config(config).get("model_type", default_model_type)).name


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); re-save the checkpoint") from None
