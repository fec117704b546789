"""The device table: memory, the part of it a model may use, memory bandwidth and published compute, with sources.

`devices.json` (shipped beside this module, schema version 1) holds the published devices; a user adds or corrects
devices with a file of the same schema (`--device-file`): an entry with a shipped id replaces the shipped one.
`this-machine` is measured when asked for: total memory, available memory as usable, and the copy bandwidth
`edgevlm bench` measures (machine.py)."""
from __future__ import annotations

import json
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import BadInputError

DEVICES_FILE = Path(__file__).with_name("devices.json")
SCHEMA_VERSION = 1
THIS_MACHINE = "this-machine"
KINDS = ("jetson", "apple", "discrete-gpu", "sbc", "host")
CONFIDENCE_KEYS = ("memory", "usable", "bandwidth", "compute")
CONFIDENCE_LEVELS = ("published", "derived", "estimate", "measured")
COMPUTE_KEYS = ("fp16_tflops", "int8_tops", "cpu", "matmul_gflops")  # matmul_gflops: this-machine, measured
ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9.-]{0,63}$")
GIB = 1 << 30


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class Device:
    """One device. Memory figures are GiB; bandwidth is GB/s, theoretical peak unless `bandwidth_measured` (then
    it is the copy bandwidth measured here, which the planner pairs with a different efficiency)."""

    id: str
    name: str
    kind: str
    memory_gib: float
    usable_gib: float  # what a model, its KV cache and buffers may take
    usable_basis: str
    bandwidth_gbs: float
    target: str  # a row of runtimes/targets.py TARGETS: the backends this device runs
    compute: dict = field(default_factory=dict)  # fp16_tflops, int8_tops (dense, GPU-only; None if unknown), cpu
    sources: list = field(default_factory=list)
    confidence: dict = field(default_factory=dict)  # memory/usable/bandwidth/compute -> published|derived|estimate|measured
    notes: str = ""
    host_memory_gib: float | None = None  # discrete GPUs: the host's RAM (the encoder may run there)
    bandwidth_measured: bool = False  # not in devices.json: set for this-machine only

    def __post_init__(self) -> None:
        from ..runtimes.targets import TARGETS

        where = f"device {self.id!r}"
        if not isinstance(self.id, str) or not ID_PATTERN.match(self.id):
            raise ValueError(f"device id {self.id!r} must be lower-case letters, digits, '-' or '.' (at most 64)")
        for name in ("name", "usable_basis"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ValueError(f"{where}: {name} must be a non-empty string")
        if self.kind not in KINDS:
            raise ValueError(f"{where}: kind {self.kind!r} is not one of {KINDS}")
        for name in ("memory_gib", "usable_gib", "bandwidth_gbs"):
            if not _positive(getattr(self, name)):
                raise ValueError(f"{where}: {name} must be a positive number, got {getattr(self, name)!r}")
        if self.usable_gib > self.memory_gib:
            raise ValueError(f"{where}: usable_gib {self.usable_gib} is more than memory_gib {self.memory_gib}")
        if self.target not in TARGETS:
            raise ValueError(f"{where}: target {self.target!r} is not one of {tuple(TARGETS)}")
        self._check_compute(where)
        if not isinstance(self.sources, list) or not all(isinstance(s, str) and s for s in self.sources):
            raise ValueError(f"{where}: sources must be a list of non-empty strings")
        if not isinstance(self.confidence, dict) or set(self.confidence) - set(CONFIDENCE_KEYS) \
                or any(v not in CONFIDENCE_LEVELS for v in self.confidence.values()):
            raise ValueError(f"{where}: confidence must map {CONFIDENCE_KEYS} to one of {CONFIDENCE_LEVELS}, "
                             f"got {self.confidence!r}")
        if self.host_memory_gib is not None and not _positive(self.host_memory_gib):
            raise ValueError(f"{where}: host_memory_gib must be a positive number or absent")
        if not isinstance(self.notes, str):
            raise ValueError(f"{where}: notes must be a string")

    def _check_compute(self, where: str) -> None:
        if not isinstance(self.compute, dict) or set(self.compute) - set(COMPUTE_KEYS):
            raise ValueError(f"{where}: compute may only have {COMPUTE_KEYS}, got {self.compute!r}")
        for name in ("fp16_tflops", "int8_tops", "matmul_gflops"):
            value = self.compute.get(name)
            if value is not None and not _positive(value):
                raise ValueError(f"{where}: compute.{name} must be a positive number or null, got {value!r}")

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    @property
    def usable_bytes(self) -> int:
        return int(self.usable_gib * GIB)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Device":
        """Unknown keys are ignored (a newer table may carry more); `bandwidth_measured` is never read from a file."""
        known = {f for f in cls.__dataclass_fields__ if f != "bandwidth_measured"}
        missing = [f for f in ("id", "name", "kind", "memory_gib", "usable_gib", "usable_basis", "bandwidth_gbs",
                               "target") if f not in data]
        if missing:
            raise ValueError(f"device {data.get('id', '?')!r} is missing {', '.join(missing)}")
        return cls(**{k: v for k, v in data.items() if k in known})


def read_table(path: Path) -> dict[str, Device]:
    """id -> Device from one file of the devices.json schema. Raises ValueError naming the file and the entry."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} cannot be read as JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("version") != SCHEMA_VERSION or not isinstance(data.get("devices"), list):
        raise ValueError(f"{path} must be {{\"version\": {SCHEMA_VERSION}, \"devices\": [...]}}")
    table: dict[str, Device] = {}
    for i, entry in enumerate(data["devices"]):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: devices[{i}] is not an object")
        try:
            device = Device.from_dict(entry)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: devices[{i}]: {exc}") from None
        if device.id in table or device.id == THIS_MACHINE:
            raise ValueError(f"{path}: device id {device.id!r} appears twice or is reserved")
        table[device.id] = device
    return table


def load_devices(device_file: str | Path | None = None) -> dict[str, Device]:
    """The shipped table, plus (replacing same ids) the user's file."""
    table = read_table(DEVICES_FILE)
    if device_file is not None:
        try:
            table.update(read_table(Path(device_file)))
        except ValueError as exc:
            raise BadInputError(f"--device-file: {exc}; see {DEVICES_FILE} for the schema") from None
    return table


def this_machine(bandwidth_gbs: float | None = None, matmul_gflops: float | None = None) -> Device:
    """This machine, measured now: psutil's total memory, its available memory as usable, the copy bandwidth
    edgevlm bench measures (machine.measure_bandwidth_gbs) and a float32 matmul probe for TTFT
    (plan/compute.measure_matmul_gflops, ~0.1 s), each unless given."""
    try:
        import psutil
    except ImportError:
        raise BadInputError("--device this-machine measures memory with psutil: pip install 'edgevlm[bench]'") from None
    from ..machine import measure_bandwidth_gbs

    memory = psutil.virtual_memory()
    from .compute import measure_matmul_gflops

    bandwidth = measure_bandwidth_gbs() if bandwidth_gbs is None else float(bandwidth_gbs)
    gflops = measure_matmul_gflops() if matmul_gflops is None else float(matmul_gflops)
    return Device(
        id=THIS_MACHINE, name=f"this machine ({platform.system()} {platform.machine()})", kind="host",
        memory_gib=memory.total / GIB, usable_gib=min(memory.available, memory.total) / GIB,
        usable_basis="available memory now (psutil), measured", bandwidth_gbs=bandwidth, target="cpu",
        compute={"fp16_tflops": None, "int8_tops": None, "matmul_gflops": gflops,
                 "cpu": f"{psutil.cpu_count(logical=False) or '?'} cores, {platform.processor() or platform.machine()}"},
        sources=["measured by edgevlm (psutil.virtual_memory, machine.measure_bandwidth_gbs, "
                 "plan/compute.measure_matmul_gflops)"],
        confidence={"memory": "measured", "usable": "measured", "bandwidth": "measured", "compute": "measured"},
        notes="bandwidth is a numpy copy (bytes read + written per second), the figure `edgevlm bench` reports",
        bandwidth_measured=True,
    )


def get_device(device_id: str, device_file: str | Path | None = None) -> Device:
    if device_id == THIS_MACHINE:
        return this_machine()
    table = load_devices(device_file)
    if device_id not in table:
        raise BadInputError(f"unknown device {device_id!r}; known devices: {', '.join(sorted(table) + [THIS_MACHINE])}"
                            " (or add yours with --device-file)")
    return table[device_id]
