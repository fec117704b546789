"""What a sweep runs: checkpoints, encoder and decoder variants, devices, and the bench workload, read from a YAML or
JSON file or from flags, validated at construction (a bad entry is one line naming it and the valid choices)."""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import BadInputError

# encoder precisions a sweep can ask for; tensorrt:* is exported as onnx:fp32 and built into an engine on the device
ENCODER_CHOICES = ("onnx:fp32", "onnx:fp16", "onnx:int8", "tensorrt:fp16", "tensorrt:int8")
# the formats each target's runtimes read (runtimes/targets.py TARGETS; MLX also runs on Linux CPUs as mlx[cpu])
TARGET_FORMATS = {
    "cpu": {"encoder": ("onnx",), "decoder": ("gguf", "mlx")},
    "cuda": {"encoder": ("onnx", "tensorrt"), "decoder": ("gguf",)},
    "jetson-orin": {"encoder": ("onnx", "tensorrt"), "decoder": ("gguf",)},
    "apple-silicon": {"encoder": ("onnx",), "decoder": ("mlx", "gguf")},
}
DEVICE_ID = re.compile(r"^[a-z0-9][a-z0-9.-]{0,63}$")


@dataclass(frozen=True)
class SweepDevice:
    """A device the bench stages run on. `plan_device` is the planner's device id (the table's entry for a published
    device; `this-machine` measures the node the stage runs on)."""

    id: str
    target: str = "cpu"
    plan_device: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not DEVICE_ID.match(self.id):
            raise BadInputError(f"device id {self.id!r} must be lower-case letters, digits, '-' or '.' (at most 64)")
        if self.target not in TARGET_FORMATS:
            raise BadInputError(f"device {self.id}: unknown target {self.target!r}; choose from {', '.join(TARGET_FORMATS)}")

    def runs(self, encoder: str, decoder: str) -> str | None:
        """None when this device's target runs the pair, else why not."""
        formats = TARGET_FORMATS[self.target]
        for role, name in (("encoder", encoder), ("decoder", decoder)):
            if name.split(":")[0] not in formats[role]:
                return f"target {self.target} does not run {role} {name}"
        return None


@dataclass(frozen=True)
class Workload:
    """The bench workload (the arguments of `edgevlm bench`); W1 by default."""

    image_size: str = "512x512"
    prompt_tokens: int = 24
    new_tokens: int = 64
    repeats: int = 5
    threads: int = 2

    def __post_init__(self) -> None:
        from ..machine import parse_size

        parse_size(self.image_size)
        for name, low, high in (("prompt_tokens", 1, 4096), ("new_tokens", 1, 4096), ("repeats", 1, 100),
                                ("threads", 1, 256)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise BadInputError(f"bench {name} must be an integer in {low}..{high}, got {value!r}")

    def bench_args(self) -> list[str]:
        return ["--image-size", self.image_size, "--prompt-tokens", str(self.prompt_tokens), "--new-tokens",
                str(self.new_tokens), "--repeats", str(self.repeats), "--threads", str(self.threads)]


@dataclass(frozen=True)
class SweepSpec:
    checkpoints: tuple[str, ...]
    encoders: tuple[str, ...]
    decoders: tuple[str, ...]
    devices: tuple[SweepDevice, ...]
    accuracy: int = 0  # questions per eval stage (reference-model checkpoints only); 0: no eval stage
    bench: Workload = field(default_factory=Workload)
    max_tiles: int = 17

    def __post_init__(self) -> None:
        from ..export.exporter import DECODER_FORMATS, parse_requests

        for name in ("checkpoints", "encoders", "decoders", "devices"):
            if not getattr(self, name):
                raise BadInputError(f"a sweep needs at least one entry in {name}")
        for path in self.checkpoints:
            if not (Path(path) / "config.json").is_file():
                raise BadInputError(f"checkpoint {path} has no config.json; give a Hugging Face checkpoint folder")
        for encoder in self.encoders:
            if encoder not in ENCODER_CHOICES:
                raise BadInputError(f"unknown encoder {encoder!r}; choose from {', '.join(ENCODER_CHOICES)}")
        for decoder in self.decoders:
            request = parse_requests(decoder, DECODER_FORMATS, "decoder")[0]  # raises with the valid choices
            if request.name != decoder:
                raise BadInputError(f"write the decoder as {request.name!r}, not {decoder!r}")
        ids = [d.id for d in self.devices]
        if len(set(ids)) != len(ids):
            raise BadInputError(f"device ids must be unique, got {', '.join(ids)}")
        if not isinstance(self.accuracy, int) or not 0 <= self.accuracy <= 100_000:
            raise BadInputError(f"accuracy must be 0..100000 questions, got {self.accuracy!r}")
        if not isinstance(self.max_tiles, int) or not 1 <= self.max_tiles <= 64:
            raise BadInputError(f"max_tiles must be 1..64, got {self.max_tiles!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, base: Path | None = None) -> "SweepSpec":
        """From a parsed YAML/JSON document; relative checkpoint paths are taken from the file's folder."""
        if not isinstance(data, dict):
            raise BadInputError("a sweep spec is a mapping with checkpoints, encoders, decoders and devices")
        known = {"checkpoints", "encoders", "decoders", "devices", "accuracy", "bench", "max_tiles"}
        unknown = set(data) - known
        if unknown:
            raise BadInputError(f"unknown sweep spec keys {sorted(unknown)}; the keys are {sorted(known)}")
        devices = []
        for item in _as_list(data.get("devices"), "devices"):
            if isinstance(item, str):
                devices.append(parse_device(item))
            elif isinstance(item, dict) and set(item) <= {"id", "target", "plan_device"}:
                devices.append(SweepDevice(**item))
            else:
                raise BadInputError(f"a device is 'id[=target]' or a mapping with id, target, plan_device; got {item!r}")
        bench = data.get("bench") or {}
        if not isinstance(bench, dict) or not set(bench) <= set(Workload.__dataclass_fields__):
            raise BadInputError(f"bench takes {', '.join(Workload.__dataclass_fields__)}; got {bench!r}")
        checkpoints = [str((base / p) if base and not Path(p).is_absolute() else Path(p))
                       for p in _as_list(data.get("checkpoints"), "checkpoints")]
        return cls(tuple(checkpoints), tuple(_as_list(data.get("encoders"), "encoders")),
                   tuple(_as_list(data.get("decoders"), "decoders")), tuple(devices), data.get("accuracy", 0),
                   Workload(**bench), data.get("max_tiles", 17))


def _as_list(value, name: str) -> list:
    if isinstance(value, str):
        return [s.strip() for s in value.split(",") if s.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, dict)) for v in value):
        return list(value)
    raise BadInputError(f"{name} must be a list (or a comma-separated string), got {value!r}")


def parse_device(text: str) -> SweepDevice:
    """'jetson-orin-nano-super-8gb' (target from the device table) or 'bench-a=cpu' (an id of your own, its target)."""
    ident, _, target = text.strip().partition("=")
    if target:
        return SweepDevice(ident, target)
    from ..plan.devices import load_devices

    table = load_devices()
    if ident not in table:
        raise BadInputError(f"device {ident!r} is not in the device table; write it as {ident}=TARGET "
                            f"(TARGET one of {', '.join(TARGET_FORMATS)})")
    return SweepDevice(ident, table[ident].target, ident)


def read_spec(path: Path) -> SweepSpec:
    """A YAML or JSON sweep file."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"sweep spec {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
        raise BadInputError(f"sweep spec {path} does not parse: {str(exc).splitlines()[0]}") from None
    return SweepSpec.from_dict(data, base=path.parent)
