"""Encoder backend on ONNX Runtime. Providers are tried TensorRT -> CUDA -> CoreML -> CPU unless one is forced;
the provider reported is the one the session really uses (onnxruntime-gpu lists CUDA even without a GPU)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..backends import thread_count
from ..errors import BackendUnavailableError, BadInputError, BundleError
from ..vision_grid import VisionGrid, encoder_feeds
from .base import Encoder

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
PREFERENCE = list(PROVIDERS.values())


def choose_providers(available: list[str], forced: str | None) -> list[str]:
    if forced:
        name = PROVIDERS.get(forced.lower(), forced)
        if name not in available:
            raise BackendUnavailableError(
                f"ONNX Runtime provider {forced!r} is not available here (available: {', '.join(available)}); "
                "install the matching onnxruntime build or drop --provider"
            )
        return [name] if name == PROVIDERS["cpu"] else [name, PROVIDERS["cpu"]]
    return [p for p in PREFERENCE if p in available] or available


# Tiles per ORT run. ORT's arena keeps the peak of the largest run, and on a CPU a bigger batch is not faster per
# tile: 17 SmolVLM-256M int8 tiles (512x512, 2 threads, Xeon) at 1/2/4 per run took 384/451/438 ms per tile with a
# process peak of 495/706/1,086 MiB (17 at once: 4.1 GB). Accelerators gain from batching, so they keep 4.
TILES_PER_RUN = 4
CPU_TILES_PER_RUN = 1


def cpu_graph(bundle: Path, artifact) -> Path:
    """The graph the CPU provider opens: the ORT-optimized copy built on this machine on first load and cached
    (onnx_cpu.py); a bundle written before that ships its own copy (details.cpu_optimized). Where the cache cannot be
    written, the portable graph (ORT then optimizes it at every load)."""
    import sys

    from ..onnx_cpu import artifact_key, cached_cpu_graph

    shipped = artifact.details.get("cpu_optimized")
    if shipped and (bundle / shipped).is_file():
        return bundle / shipped
    graph = bundle / artifact.path
    try:
        return cached_cpu_graph(graph, artifact_key([f.sha256 for f in artifact.files]),
                                bool(artifact.details.get("cpu_attention_fusion")))
    except OSError as exc:
        print(f"edgevlm: could not cache the CPU-optimized graph ({exc.strerror or exc}); running {graph.name}",
              file=sys.stderr)
        return graph
    except Exception as exc:  # noqa: BLE001 - ORT's own error types: a graph it cannot load is the bundle's problem
        raise BundleError(f"ONNX Runtime cannot load {graph.name} ({str(exc)[:200]}); re-export the bundle") from None


class OnnxRuntimeEncoder(Encoder):
    name = "onnxruntime"

    def __init__(self, bundle: Path, artifact, encoder_spec, provider: str | None = None, threads: int | None = None,
                 warmup: bool = True):
        import onnxruntime as ort

        artifact.verify(bundle)
        self.artifact_id = f"{artifact.name}:{artifact.files[0].sha256}"
        self.spec = encoder_spec
        self.precision = artifact.precision
        providers = choose_providers(ort.get_available_providers(), provider)
        graph = bundle / artifact.path
        if providers[0] == PROVIDERS["cpu"]:
            graph = cpu_graph(bundle, artifact)
        options = ort.SessionOptions()
        options.intra_op_num_threads = thread_count(threads)
        options.log_severity_level = 3
        # ORT's idle worker threads spin for a while after each run; llama.cpp prefills right after the encode on
        # the same cores, so spinning only steals its time
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.graph_bytes = graph.stat().st_size + sum(f.stat().st_size for f in graph.parent.glob(f"{graph.name}.data"))
        try:
            self.session = ort.InferenceSession(str(graph), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT's own error types: a graph it cannot load is the bundle's problem
            raise BundleError(f"ONNX Runtime cannot load {graph.name} ({str(exc)[:200]}); re-export the bundle") from None
        self.grid_spec = self._check_io(graph.name, encoder_spec)
        self.provider = self.session.get_providers()[0]
        if provider and self.provider != providers[0]:
            raise BackendUnavailableError(
                f"ONNX Runtime could not start provider {providers[0]} (it fell back to {self.provider}); "
                "check the GPU driver / CUDA libraries"
            )
        self.name = f"onnxruntime-{self.provider.removesuffix('ExecutionProvider').lower()}"
        self.run_options = ort.RunOptions()
        # Hand the CPU arena's activation blocks back after each run: llama.cpp prefills right after the encode,
        # and on W1 the arena otherwise stays ~80 MiB above the graph between tiles (same speed, A/B medians)
        self.run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        if warmup:
            self._warmup()

    def _check_io(self, graph_name: str, spec) -> VisionGrid | None:
        """The graph's inputs and output are the ones the manifest names, with its fixed sizes; a grid encoder's
        inputs must be ones this runtime knows how to compute."""
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        wanted = [i["name"] for i in spec.inputs] if spec.kind == "grid" else [spec.input_name]
        wanted += list(spec.instruction["inputs"]) if spec.instruction else []
        if sorted(wanted) != sorted(inputs) or spec.output_name not in outputs:
            raise BundleError(f"{graph_name} has inputs {sorted(inputs)} and outputs {outputs}, but the manifest names "
                              f"{', '.join(map(repr, wanted))} and {spec.output_name!r}; re-export the bundle")
        graph_shape = inputs[spec.input_name][1:]
        if [d for d in graph_shape if isinstance(d, int)] != list(spec.input_shape[1:]):
            raise BundleError(f"{graph_name} takes {spec.input_name} of {graph_shape} but the manifest says "
                              f"{spec.input_shape[1:]}; re-export the bundle")
        if spec.kind != "grid":
            return None
        grid_spec = VisionGrid.from_dict(spec.vision_grid)
        if sorted(wanted) != sorted(grid_spec.input_names()):  # e.g. window sizes but no window input
            raise BundleError(f"the manifest's grid encoder takes {wanted}, but its vision numbers imply "
                              f"{grid_spec.input_names()}; upgrade edgevlm or re-export the bundle")
        return grid_spec

    def _warmup(self) -> None:
        if self.grid_spec is None:
            self.encode(np.zeros((1, *self.spec.input_shape[1:]), dtype=np.float32))
        else:  # the smallest image: one merged token
            merge = self.grid_spec.merge_size
            self.encode(np.zeros((merge * merge, self.grid_spec.patch_dim), dtype=np.float32), grid=(1, merge, merge))

    def encode(self, pixel_values: np.ndarray, grid: tuple[int, int, int] | None = None,
               instruction: np.ndarray | None = None) -> np.ndarray:
        """tiles (tiles, 3, H, W) -> (tiles, T, D); a grid encoder: one image's patches (P, C*T*p*p) and its
        (t, h, w) grid in patches -> (t*h*w / merge^2, D). An encoder that reads the instruction (InstructBLIP)
        takes its (n,) ids (default: the manifest's default_ids) for every tile."""
        if self.grid_spec is not None or grid is not None:
            return self._encode_grid(pixel_values, grid)
        if instruction is not None and not self.spec.instruction:
            raise BadInputError("this encoder takes pixels only; it was given an instruction")
        expected = tuple(self.spec.input_shape[1:])
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise BadInputError(f"encoder input must be (tiles, {', '.join(map(str, expected))}), got {pixel_values.shape}")
        pixel_values = np.ascontiguousarray(pixel_values, dtype=np.float32)
        per_run = CPU_TILES_PER_RUN if self.provider == PROVIDERS["cpu"] else TILES_PER_RUN
        step = max(1, min(self.spec.max_tiles, per_run))
        chunks = [pixel_values[i : i + step] for i in range(0, len(pixel_values), step)]
        outputs = [self.session.run([self.spec.output_name], {self.spec.input_name: c, **self._instruction_feeds(
                   len(c), instruction)}, self.run_options)[0] for c in chunks]
        return np.concatenate(outputs).astype(np.float32, copy=False)  # (tiles, T, D)

    def _instruction_feeds(self, tiles: int, instruction: np.ndarray | None) -> dict:
        if not self.spec.instruction:
            return {}
        ids = np.asarray(self.spec.instruction["default_ids"] if instruction is None else instruction, dtype=np.int64)
        if ids.ndim != 1 or not 1 <= len(ids) <= self.spec.instruction["max_tokens"]:
            raise BadInputError(f"the instruction must be 1 to {self.spec.instruction['max_tokens']} ids, got shape "
                                f"{ids.shape}")
        ids = np.ascontiguousarray(np.broadcast_to(ids, (tiles, len(ids))))
        names = self.spec.instruction["inputs"]
        return {names[0]: ids, names[1]: np.ones_like(ids)}

    def _encode_grid(self, pixel_values: np.ndarray, grid) -> np.ndarray:
        if self.grid_spec is None:
            raise BadInputError("this encoder takes fixed-size tiles (tiles, 3, H, W); it was given a grid")
        if grid is None:
            raise BadInputError("this encoder takes one image's patches and its (t, h, w) grid; pass grid=")
        try:
            feeds = encoder_feeds(pixel_values, grid, self.grid_spec)  # (P, C*T*p*p) patches + what the grid implies
        except ValueError as exc:
            raise BadInputError(f"encoder input: {exc}") from None
        names = [i["name"] for i in self.spec.inputs]
        out = self.session.run([self.spec.output_name], {name: feeds[name] for name in names}, self.run_options)[0]
        return out.astype(np.float32, copy=False)  # (M, D)
