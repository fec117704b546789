"""The sweep spec expanded into stages: per cell (checkpoint, encoder, decoder) one export and one verify on a build
host; per cell and device a build-engine (TensorRT encoders), an eval (reference-model checkpoints, when accuracy is
asked for) and a bench, all on the device and one at a time there."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .bundles import bundle_id, identity
from .spec import SweepSpec

STAGE_KINDS = ("export", "verify", "build-engine", "eval", "bench")


@dataclass(frozen=True)
class Stage:
    kind: str
    bundle: str  # bundle id
    cell: dict = field(hash=False, compare=False)  # checkpoint, encoder, decoder, identity
    device: dict | None = field(default=None, hash=False, compare=False)  # SweepDevice as a dict; None: a build host
    after: tuple[str, ...] = ()  # keys of the stages that must succeed first

    def __post_init__(self) -> None:
        if self.kind not in STAGE_KINDS:
            raise ValueError(f"stage kind {self.kind!r} is not one of {STAGE_KINDS}")

    @property
    def device_id(self) -> str | None:
        return self.device["id"] if self.device else None

    @property
    def key(self) -> str:
        """Unique in a sweep: kind, bundle, the encoder when the device runs a variant of the bundle, and device."""
        where = f"@{self.device_id}" if self.device else ""
        return f"{self.kind}:{self.bundle}:{self.cell['encoder']}{where}"

    @property
    def exclusive(self) -> bool:
        """Device stages hold the device's one bench token: nothing else runs on a device while one of them does."""
        return self.device is not None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "bundle": self.bundle, "cell": self.cell, "device": self.device,
                "after": list(self.after), "key": self.key}


@dataclass(frozen=True)
class Expansion:
    stages: list[Stage]
    not_run: list[str]  # "cell on device: why" for pairs a device's target cannot run


def is_reference(checkpoint: str) -> bool:
    return (Path(checkpoint) / "edgevlm_reference.json").is_file()


def expand(spec: SweepSpec) -> Expansion:
    stages: dict[str, Stage] = {}
    not_run: list[str] = []

    def add(stage: Stage) -> Stage:
        stages.setdefault(stage.key, stage)
        return stages[stage.key]

    for checkpoint in spec.checkpoints:
        for decoder in spec.decoders:
            for encoder in spec.encoders:
                ident = identity(checkpoint, encoder, decoder, spec.max_tiles)
                bid = bundle_id(ident)
                cell = {"checkpoint": checkpoint, "encoder": encoder, "decoder": decoder, "identity": ident}
                # export and verify belong to the bundle, whose exported encoder a TensorRT cell shares with onnx:fp32
                shared = {**cell, "encoder": ident["encoder"]}
                export = add(Stage("export", bid, shared))
                add(Stage("verify", bid, shared, after=(export.key,)))
                for device in spec.devices:
                    why = device.runs(encoder, decoder)
                    if why:
                        not_run.append(f"{Path(checkpoint).name} {encoder} + {decoder} on {device.id}: {why}")
                        continue
                    where = {"id": device.id, "target": device.target, "plan_device": device.plan_device}
                    before = (export.key,)
                    if encoder.startswith("tensorrt:"):
                        before = (add(Stage("build-engine", bid, cell, where, before)).key,)
                    if spec.accuracy and is_reference(checkpoint):
                        add(Stage("eval", bid, cell, where, before))
                    add(Stage("bench", bid, cell, where, before))
    return Expansion(list(stages.values()), not_run)
