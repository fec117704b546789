"""The bundle contract (manifest.json, schema version 1): everything a runtime needs, nothing guessed from shapes.
Documented in docs/bundle-format.md. Loading checks the schema version and every artifact's sha256 (once per file
version: hash_stamps remembers a checked file by its size, mtime and inode)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import hash_stamps
from .errors import BundleError
from .layout import ImageLayout
from .preprocess import PreprocessSpec

FORMAT = "edgevlm-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ROLES = ("encoder", "decoder", "tokenizer", "engine")
MMPROJ_FORMAT = "gguf-mmproj"  # llama.cpp's vision half, for llama-mtmd-cli / llama-server / Ollama
MMPROJ_PRECISIONS = ("f16", "f32", "q8_0")  # preferred first: f16 is what llama.cpp's own converter writes
INSTRUCTION_TOKENIZER = "tokenizer:instruction"  # the artifact of an encoder's own prompt tokenizer (InstructBLIP)


from .hash_stamps import sha256_file  # noqa: E402,F401 - the exporters' name for it


@dataclass
class FileEntry:
    path: str  # relative to the bundle root, POSIX separators
    sha256: str
    bytes: int


@dataclass
class Artifact:
    """One runnable thing: an ONNX graph (+ external data), a GGUF, an MLX folder, a TensorRT plan, the tokenizer."""

    name: str  # e.g. "onnx:int8", "gguf:q4_k_m", "mlx:4bit", "tokenizer"
    role: str
    format: str  # onnx | gguf | mlx | tensorrt | hf-tokenizer
    precision: str
    path: str  # main file or folder, relative
    files: list[FileEntry]
    details: dict[str, Any] = field(default_factory=dict)  # quantization method, fallbacks, TensorRT version, ...

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise BundleError(f"artifact {self.name}: role {self.role!r} is not one of {ROLES}")
        self.files = [f if isinstance(f, FileEntry) else FileEntry(**f) for f in self.files]

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    def verify(self, root: Path) -> None:
        inside = Path(root).resolve()
        for relative in [self.path] + [entry.path for entry in self.files]:
            resolved = (Path(root) / relative).resolve()
            if resolved != inside and inside not in resolved.parents:  # a symlink may still point outside
                raise BundleError(f"bundle {root}: {relative} (artifact {self.name}) leads outside the bundle; refused")
        for entry in self.files:
            file = root / entry.path
            if not file.is_file():
                raise BundleError(f"bundle {root} is incomplete: {entry.path} is missing (artifact {self.name}); re-export")
            if file.stat().st_size != entry.bytes or not hash_stamps.matches(file, entry.sha256):
                raise BundleError(
                    f"bundle file {file} does not match its sha256 in the manifest (artifact {self.name}): it was changed "
                    "or comes from another export; re-export the bundle"
                )


ENCODER_KINDS = ("tiles", "grid")


@dataclass
class EncoderSpec:
    """The encoder graph's IO contract. "tiles": one input (tiles, 3, H, W) -> (tiles, T, D). "grid" (native
    resolution, Qwen2-VL): one image per call, every input listed in `inputs` (the runtime computes the auxiliary
    ones from the image's grid with `vision_grid`), output (merged, D); `dynamic_axes` bounds each named axis."""

    input_name: str  # grid: the patches input, one of `inputs`
    output_name: str
    input_shape: list  # tiles: ["tiles", 3, H, W]; grid: ["patches", C*T*p*p]
    output_shape: list  # tiles: ["tiles", T, D]; grid: ["merged", D]
    max_tiles: int  # grid: 1 (one image per call)
    dtype: str = "float32"
    kind: str = "tiles"  # ENCODER_KINDS
    inputs: list = field(default_factory=list)  # grid: [{"name", "dtype", "shape": ["patches", 2]}, ...] in graph order
    dynamic_axes: dict = field(default_factory=dict)  # grid: {"patches": {"min", "max", "multiple_of"}, "merged": ...}
    vision_grid: dict | None = None  # grid: vision_grid.VisionGrid.to_dict() (patch, merge and window sizes, ...)
    # slices of decoder.hidden_size per output row: 1, or 1 + k with DeepStack (Qwen3-VL: the main embedding, then
    # the slices the decoder adds after its first k layers; runtimes/base.Segment)
    row_slices: int = 1
    # the encoder also reads the prompt (InstructBLIP's Q-Former): {"tokenizer": folder in the bundle, "max_tokens",
    # "inputs": [ids, mask] graph input names (tiles, n) int64, "default_ids": what an encode without a prompt reads}
    instruction: dict | None = None

    def __post_init__(self) -> None:
        if self.instruction is not None:
            keys = ("tokenizer", "max_tokens", "inputs", "default_ids")
            inputs = self.instruction.get("inputs") if isinstance(self.instruction, dict) else None
            if not (isinstance(self.instruction, dict) and all(k in self.instruction for k in keys)
                    and isinstance(inputs, list) and len(inputs) == 2 and all(isinstance(i, str) for i in inputs)
                    and isinstance(self.instruction["max_tokens"], int)
                    and isinstance(self.instruction["tokenizer"], str) and ".." not in self.instruction["tokenizer"]
                    and isinstance(self.instruction["default_ids"], list)):
                raise BundleError(f"encoder.instruction must name {', '.join(keys)} (two input names); got "
                                  f"{self.instruction!r}; re-export the bundle")
        if not isinstance(self.row_slices, int) or self.row_slices < 1:
            raise BundleError(f"encoder.row_slices must be an integer >= 1, got {self.row_slices!r}; re-export")
        if self.kind not in ENCODER_KINDS:
            raise BundleError(f"encoder.kind {self.kind!r} is not one of {ENCODER_KINDS}; upgrade edgevlm or re-export")
        if self.kind != "grid":
            return
        if not self.vision_grid or self.input_name not in [i["name"] for i in self.inputs]:
            raise BundleError("a grid encoder needs encoder.vision_grid and encoder.inputs naming encoder.input_name; "
                              "re-export the bundle")
        from .vision_grid import VisionGrid

        try:
            VisionGrid.from_dict(self.vision_grid)
        except (TypeError, ValueError) as exc:
            raise BundleError(f"encoder.vision_grid: {exc}; re-export the bundle") from None


@dataclass
class DecoderSpec:
    architecture: str  # a row of decoder_arch.ARCHITECTURES ("llama")
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    context_length: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    position_scheme: str = "1d"  # positions.POSITION_SCHEMES: "1d", or "mrope" (Qwen2-VL: (t, row, col) positions)
    image_attention: str = "causal"  # positions.IMAGE_ATTENTION
    mrope_section: list | None = None  # mrope: rotary frequency pairs per axis (t, row, col), summing to head_dim / 2
    spatial_merge_size: int | None = None  # mrope: patches merged per side into one image row (the grid's unit)
    # local (sliding-window) attention, Gemma 3: the window of the local layers, every `global_every`-th layer
    # global; the local layers' RoPE base (rope_theta is the global layers')
    sliding_window: int | None = None
    global_every: int | None = None
    rope_local_theta: float | None = None

    def __post_init__(self) -> None:
        if self.position_scheme == "mrope":
            if not (isinstance(self.mrope_section, list) and len(self.mrope_section) == 3
                    and sum(self.mrope_section) == self.head_dim // 2):
                raise BundleError(f"decoder.mrope_section {self.mrope_section!r} must be three counts summing to "
                                  f"head_dim / 2 = {self.head_dim // 2}; re-export the bundle")


def _check_supported(where: str, decoder: dict) -> None:
    """A contract value this runtime does not implement is refused, never run with the wrong semantics."""
    from .decoder_arch import ARCHITECTURES
    from .positions import IMAGE_ATTENTION, POSITION_SCHEMES

    for field_name, supported, default in (("architecture", tuple(ARCHITECTURES), None),
                                           ("position_scheme", POSITION_SCHEMES, "1d"),
                                           ("image_attention", IMAGE_ATTENTION, "causal")):
        value = decoder.get(field_name, default)
        if value not in supported:
            raise BundleError(f"{where}: decoder.{field_name} is {value!r}, which this edgevlm cannot run (it supports "
                              f"{', '.join(supported)}); upgrade edgevlm or re-export the bundle")


def _video(data):
    """The manifest's video section, checked by building its spec (a ValueError says what is wrong)."""
    from .video.kinds import video_spec_from_dict

    video_spec_from_dict(data)
    return data


@dataclass
class Manifest:
    family: str
    source: dict  # {"path", "sha256", "architecture"}
    preprocess: PreprocessSpec
    image_layout: ImageLayout
    encoder: EncoderSpec
    decoder: DecoderSpec
    tokenizer: dict  # {"path", "chat_template", "stop_token_ids", "bos_token_id", "eos_token_id"}
    artifacts: list[Artifact] = field(default_factory=list)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    edgevlm_version: str = ""
    video: dict | None = None  # the family's video processing (edgevlm.video.kinds), None: images only

    def to_json(self) -> str:
        data = asdict(self)
        if data["video"] is None:  # an images-only bundle's manifest stays as before
            del data["video"]
        return json.dumps(data, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict, where: str = MANIFEST) -> "Manifest":
        if data.get("format") != FORMAT:
            raise BundleError(f"{where} is not an edgevlm bundle manifest (format={data.get('format')!r})")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"{where} has bundle format version {version}; this edgevlm reads version {FORMAT_VERSION}: re-export "
                "the bundle with this edgevlm or install the edgevlm that wrote it"
            )
        decoder = data.get("decoder") if isinstance(data.get("decoder"), dict) else {}
        _check_supported(where, decoder)
        from .manifest_check import validate

        validate(data, where)  # field by field: after this, construction below cannot meet a wrong type
        try:
            return cls(
                family=data["family"],
                source=data["source"],
                preprocess=PreprocessSpec.from_dict(data["preprocess"]),
                image_layout=ImageLayout.from_dict(data["image_layout"]),
                encoder=EncoderSpec(**data["encoder"]),
                decoder=DecoderSpec(**data["decoder"]),
                tokenizer=data["tokenizer"],
                artifacts=[Artifact(**a) for a in data.get("artifacts", [])],
                format=data["format"],
                format_version=version,
                edgevlm_version=data.get("edgevlm_version", ""),
                video=_video(data.get("video")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{where} is malformed ({type(exc).__name__}: {exc}); re-export the bundle") from None

    @classmethod
    def load(cls, bundle: str | Path) -> "Manifest":
        bundle = Path(bundle)
        file = bundle / MANIFEST
        if not file.is_file():
            raise BundleError(f"{bundle} is not a bundle: {MANIFEST} is missing; create one with `edgevlm export`")
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise BundleError(f"{file} is not valid JSON ({exc}); the bundle is damaged, re-export it") from None
        return cls.from_dict(data, str(file))

    def find(self, role: str, name: str | None = None) -> Artifact:
        matches = [a for a in self.artifacts if a.role == role and (name is None or a.name == name)]
        if not matches:
            have = ", ".join(a.name for a in self.artifacts if a.role == role) or "none"
            wanted = name or role
            raise BundleError(f"the bundle has no {role} artifact {wanted!r} (it has: {have}); export it with `edgevlm export`")
        return matches[0]

    def names(self, role: str, runnable: bool = False) -> list[str]:
        """runnable: only what edgevlm's own runtime runs (an mmproj is for llama.cpp's mtmd, see bench/peers/mtmd.py)."""
        return [a.name for a in self.artifacts if a.role == role and not (runnable and a.format == MMPROJ_FORMAT)]

    def mmproj_names(self) -> list[str]:
        """The bundle's llama.cpp mmproj artifacts, preferred first."""
        have = {a.precision: a.name for a in self.artifacts if a.format == MMPROJ_FORMAT}
        return [have[p] for p in MMPROJ_PRECISIONS if p in have]
