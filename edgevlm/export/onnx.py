"""Encoder + projector -> ONNX: fp32 (torch.onnx dynamo exporter, one dynamic axis `tiles`), fp16 (fp32 IO kept),
int8 (onnxruntime quantization, chosen by accuracy in onnx_int8.py). One portable graph per precision; the CPU
provider's optimized copy is built on the machine that runs it (onnx_cpu.py)."""
from __future__ import annotations

import gc
import logging
import shutil
import warnings
from pathlib import Path

import torch

from ..manifest import Artifact
from .bundle import BundleWriter
from .onnx_int8 import EXTERNAL_DATA_BYTES, instruction_feeds, quantize_int8


def _quiet_exporter() -> None:
    for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "torch.onnx._internal.exporter._registration"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="torch.onnx")
    warnings.filterwarnings("ignore", category=FutureWarning)  # pytree deprecations inside torch.export


def export_graph(vision, encoder_spec, path: Path) -> Path:
    """Export a module with the encoder signature (fp32 in, fp32 out); its compute dtype is the module's."""
    import onnx

    _quiet_exporter()
    if encoder_spec.kind == "grid":
        return export_grid_graph(vision, encoder_spec, path)
    _, channels, height, width = encoder_spec.input_shape
    dummy = torch.zeros(min(2, encoder_spec.max_tiles), channels, height, width)
    n_bytes = sum(p.numel() * p.element_size() for p in vision.parameters())
    tiles = torch.export.Dim("tiles", min=1, max=max(2, encoder_spec.max_tiles))
    args, names, shapes = (dummy,), [encoder_spec.input_name], ({0: tiles},)
    if encoder_spec.instruction:  # InstructBLIP: (tiles, n) ids + mask, n the instruction's own axis
        n = torch.export.Dim("instruction_tokens", min=2, max=int(encoder_spec.instruction["max_tokens"]))
        ids = torch.ones(len(dummy), 5, dtype=torch.long)  # not 2: the exporter would specialise a size it met twice
        args, names = (dummy, ids, torch.ones_like(ids)), names + list(encoder_spec.instruction["inputs"])
        shapes = ({0: tiles}, {0: tiles, 1: n}, {0: tiles, 1: n})
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            vision, args, str(path), dynamo=True, input_names=names,
            output_names=[encoder_spec.output_name], dynamic_shapes=shapes,
            external_data=n_bytes > EXTERNAL_DATA_BYTES, verbose=False,
        )
    _drop_rewriter_state()
    onnx.checker.check_model(str(path), full_check=False)
    return path


# The example image the grid graph is traced with: merged tokens 4 x 6 (not square, not 1, several windows), so that
# torch.export keeps the patch axis symbolic instead of specialising it.
GRID_EXAMPLE_MERGED = (4, 6)


def export_grid_graph(vision, encoder_spec, path: Path) -> Path:
    """One graph for every image size: each input's patch axis is merge^2 x the dynamic merged-token axis (a derived
    dim, so the merger's reshape to (merged, merge^2 * C) needs no guard). `vision` is the family's grid encoder (its
    export_module() is traced) or an export module already."""
    import onnx

    from ..vision_grid import VisionGrid, encoder_feeds

    grid_spec = VisionGrid.from_dict(encoder_spec.vision_grid)
    module = vision.export_module() if hasattr(vision, "export_module") else vision
    merge = grid_spec.merge_size
    grid = (1, GRID_EXAMPLE_MERGED[0] * merge, GRID_EXAMPLE_MERGED[1] * merge)
    patches = torch.zeros(grid[1] * grid[2], grid_spec.patch_dim).numpy()
    feeds = encoder_feeds(patches, grid, grid_spec)
    names = [i["name"] for i in encoder_spec.inputs]
    axis = encoder_spec.dynamic_axes["merged"]
    merged = torch.export.Dim("merged", min=1, max=max(int(axis["max"]), 2 * GRID_EXAMPLE_MERGED[0] * GRID_EXAMPLE_MERGED[1]))
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            module, tuple(torch.from_numpy(feeds[n]) for n in names), str(path), dynamo=True, input_names=names,
            output_names=[encoder_spec.output_name], dynamic_shapes=tuple({0: merge * merge * merged} for _ in names),
            external_data=n_bytes > EXTERNAL_DATA_BYTES, verbose=False,
        )
    _drop_rewriter_state()
    _tidy_grid_graph(path, encoder_spec.output_name, "merged")
    onnx.checker.check_model(str(path), full_check=False)
    return path


def _tidy_grid_graph(path: Path, output: str, axis: str) -> None:
    """Two fixes to what the exporter writes. Its value_info also lists the weights: with 2-D activations every
    Linear is a Gemm (transB=1), ORT's dynamic quantizer turns those into MatMul by transposing the weight, and the
    stale (out, in) shape then fails its shape inference. And the output's first axis is named after an internal
    symbol (s85); the manifest calls it `axis`."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {init.name for init in model.graph.initializer}
    kept = [v for v in model.graph.value_info if v.name not in weights]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    for value in model.graph.output:
        if value.name == output and not value.type.tensor_type.shape.dim[0].dim_value:
            value.type.tensor_type.shape.dim[0].dim_param = axis
    onnx.save(model, str(path))


def _drop_rewriter_state() -> None:
    """onnxscript's rewrite rules are module-level objects whose pattern matchers keep the last graph they matched,
    and through it every weight the exporter put in that graph: the fp32 vision tower (SmolVLM2-2.2B: 1.66 GB) stayed
    alive after the torch weights were freed. A matcher sets all of these again at the start of each match."""
    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:  # another onnxscript layout: nothing known to clear
        return
    for obj in gc.get_objects():
        if isinstance(obj, SimplePatternMatcher):
            for attr in ("_graph", "_match", "_current_node", "_tracer"):
                obj.__dict__.pop(attr, None)


class HalfPrecision(torch.nn.Module):
    """fp16 weights and compute behind the fp32 signature callers use."""

    def __init__(self, vision):
        super().__init__()
        import copy

        self.inner = copy.deepcopy(vision).half()  # never mutate the caller's module

    def forward(self, pixel_values, vision_pos=None, window_ids=None, table_weights=None):
        # (an instruction-reading encoder's ids and mask come in the same places: integers, passed on as they are)
        # a grid encoder's positions and window ids are integers: only the pixels change dtype. Named parameters, not
        # *args: torch.export matches dynamic_shapes to the signature's parameters. The inputs after the pixels are
        # passed on in order whatever they are (Qwen3-VL: positions, table ids, table weights; its module casts them)
        grid_inputs = [t for t in (vision_pos, window_ids, table_weights) if t is not None]
        return self.inner(pixel_values.half(), *grid_inputs).float()


def choose_cpu_fusion(graph: Path, staged: Path, encoder_spec, log=print, reference: Path | None = None) -> bool:
    """Should the CPU graph run attention fused (onnx_cpu.fuse_attention)? For a tiles encoder, yes when on a probe
    tile the fused graph is as close to `reference` (the fp32 graph a quantized one came from; else the graph itself)
    as the unfused graph, within ATTENTION_FUSION_TOLERANCE (an int8 graph quantizes its activations at run time, so
    fusing moves its output by ~1e-4 in cosine, as much closer to fp32 as farther). The fused candidate is built at
    `staged` (the caller keeps it when chosen)."""
    import numpy as np
    import onnxruntime as ort

    from ..metrics import cosine
    from ..onnx_cpu import ATTENTION_FUSION_TOLERANCE, build_cpu_graph

    if encoder_spec is None or encoder_spec.kind != "tiles":
        return False
    if not build_cpu_graph(graph, staged, fuse=True):
        return False  # nothing matched
    tile = np.random.default_rng(0).normal(size=(1, *encoder_spec.input_shape[1:])).astype(np.float32)
    feed = {encoder_spec.input_name: tile, **instruction_feeds(encoder_spec, 1)}

    def output(source: Path):
        return ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, feed)[0]

    expected = output(reference or graph)
    unfused = cosine(output(graph), expected) if reference else 1.0
    try:
        agreement, reason = cosine(output(staged), expected), ""
    except Exception as exc:  # noqa: BLE001 - e.g. no CPU kernel of the fused op for this graph's dtype
        agreement, reason = float("nan"), str(exc).splitlines()[0][:120]
    fused = sum(1 for _ in _fused_ops(staged))
    if agreement != agreement:
        log(f"  attention fusion not used: ONNX Runtime cannot run the fused graph ({reason})")
        return False
    if agreement >= unfused - ATTENTION_FUSION_TOLERANCE:
        log(f"  fused {fused} attention blocks into MultiHeadAttention for the CPU graph (cosine {agreement:.6f}, "
            f"unfused {unfused:.6f}, against {'fp32' if reference else 'the unfused graph'} on a probe tile)")
        return True
    log(f"  attention fusion gave cosine {agreement:.6f} (unfused {unfused:.6f}) on a probe tile; not used")
    return False


def _fused_ops(graph: Path):
    import onnx

    return (n for n in onnx.load(str(graph), load_external_data=False).graph.node if n.op_type == "MultiHeadAttention")


def ensure_fp32_graph(ckpt, manifest, writer: BundleWriter, log=print) -> Path:
    """The fp32 graph every variant starts from, exported once (the only step of onnx:int8 that needs torch)."""
    scratch = writer.root / ".work"
    scratch.mkdir(exist_ok=True)
    fp32 = scratch / "fp32.onnx"
    if not fp32.exists():
        log("  exporting the vision module to ONNX (fp32)")
        export_graph(ckpt.vision, manifest.encoder, fp32)
    return fp32


def export_encoder(ckpt, manifest, writer: BundleWriter, precision: str, log=print, threads=None, **_) -> Artifact:
    folder = writer.root / "encoder"
    folder.mkdir(exist_ok=True)
    fp32 = ensure_fp32_graph(ckpt, manifest, writer, log)
    scratch = fp32.parent
    graph = folder / f"{precision}.onnx"
    if precision == "fp32":
        shutil.copy(fp32, graph)
        for data in scratch.glob("fp32.onnx.data"):
            shutil.copy(data, folder / data.name)
        details = {}
    elif precision == "fp16":
        log("  exporting an fp16 graph (fp32 inputs and outputs)")
        vision = ckpt.vision.export_module() if manifest.encoder.kind == "grid" else ckpt.vision
        export_graph(HalfPrecision(vision).eval(), manifest.encoder, graph)
        details = {"io_dtype": "float32", "compute_dtype": "float16"}
    else:
        log("  quantizing to int8 (onnxruntime: dynamic and static QDQ, chosen by accuracy on held-out inputs)")
        details = {**quantize_int8(fp32, graph, manifest, log), "activation_type": "uint8", "per_channel": True}
    extras = tuple(p.relative_to(writer.root).as_posix() for p in folder.glob(f"{precision}.*") if p != graph)
    artifact = writer.artifact(f"onnx:{precision}", "encoder", "onnx", precision, f"encoder/{precision}.onnx",
                               extra_files=extras, **details)
    # the CPU provider's copy is built where it runs (onnx_cpu.cached_cpu_graph); here to decide the attention fusion
    # and to measure the planner's activation term (per tile; a grid encoder: at two image sizes) on the graph the CPU
    # runtime will open, in a fresh process (plan/probe.py). Built in this machine's cache: its first load reuses it.
    from ..onnx_cpu import artifact_key, cached_cpu_graph, cpu_graph_path
    from ..plan.probe import encoder_memory_details

    key = artifact_key([f.sha256 for f in artifact.files])
    candidate = cpu_graph_path(key, fuse=True)  # the fused candidate is built where the cache keeps it when chosen
    fuse = False
    try:
        fuse = choose_cpu_fusion(graph, candidate, manifest.encoder, log,
                                 reference=None if precision == "fp32" else fp32)
    finally:
        if not fuse:
            for path in (candidate, candidate.with_name(f"{candidate.name}.data")):
                path.unlink(missing_ok=True)
    cpu_graph = cached_cpu_graph(graph, key, fuse)  # chosen: the candidate itself; else the plain graph, built now
    log("  measuring its activation memory (ONNX Runtime CPU)")
    artifact.details.update({**encoder_memory_details(cpu_graph, manifest.encoder, threads),
                             "cpu_attention_fusion": fuse})
    return artifact


def release_intermediates(writer: BundleWriter) -> None:
    """The fp32 graph every variant starts from, deleted once all are written."""
    for path in (writer.root / ".work").glob("fp32.onnx*"):
        path.unlink()
