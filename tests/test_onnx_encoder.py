"""ONNX encoder artifacts against the PyTorch vision module (DESIGN.md's parity ladder)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgevlm.errors import BackendUnavailableError
from edgevlm.families import load_checkpoint
from edgevlm.manifest import Manifest
from edgevlm.runtimes.onnx_encoder import OnnxRuntimeEncoder, choose_providers
from edgevlm.verify import cosine, max_rel_err

FAMILIES = ["llava-clip", "llava-siglip", "idefics3"]


def encoder(bundle, name):
    manifest = Manifest.load(bundle)
    return OnnxRuntimeEncoder(bundle, manifest.find("encoder", name), manifest.encoder, threads=1)


def reference(ckpts, family, pixels):
    with torch.inference_mode():
        return load_checkpoint(ckpts[family]).vision(torch.from_numpy(pixels)).numpy()


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_max_relative_error(family, ckpts, bundles, pixels):
    ours = encoder(bundles[family], "onnx:fp32").encode(pixels)
    ref = reference(ckpts, family, pixels)
    assert ours.shape == ref.shape
    assert max_rel_err(ours, ref) <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_many_tiles_in_one_call_equal_per_tile_calls(family, bundles, pixels):
    enc = encoder(bundles[family], "onnx:fp32")
    together = enc.encode(pixels)
    one_by_one = np.concatenate([enc.encode(pixels[i : i + 1]) for i in range(len(pixels))])
    assert np.allclose(together, one_by_one, atol=1e-5)


def test_more_tiles_than_the_graph_bound_are_run_in_chunks_of_the_bound(ckpts, tmp_path, monkeypatch):
    """A graph exported for at most 2 tiles (below the runtime's TILES_PER_RUN) never gets more than 2 per run."""
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint
    from edgevlm.runtimes import onnx_encoder
    from edgevlm.runtimes.onnx_encoder import TILES_PER_RUN

    monkeypatch.setattr(onnx_encoder, "CPU_TILES_PER_RUN", TILES_PER_RUN)  # the accelerators' batch, here on the CPU

    bundle = export_checkpoint(ckpts["idefics3"], tmp_path / "b", [ArtifactRequest("onnx", "fp32")], [], max_tiles=2)
    enc = encoder(bundle, "onnx:fp32")
    assert enc.spec.max_tiles == 2 < TILES_PER_RUN
    run, batches = enc.session.run, []

    def recording_run(names, feeds, *options):
        batches.append(len(feeds[enc.spec.input_name]))
        return run(names, feeds, *options)

    enc.session.run = recording_run
    many = np.random.default_rng(1).normal(size=(5, 3, 32, 32)).astype(np.float32)
    out = enc.encode(many)
    assert batches == [2, 2, 1]
    one_by_one = np.concatenate([enc.encode(many[i : i + 1]) for i in range(5)])
    assert np.allclose(out, one_by_one, atol=1e-5)


def test_the_cpu_provider_encodes_one_tile_per_run(bundles):
    """On a CPU a batch of tiles is no faster per tile, and ORT's arena keeps the largest batch's activations for the
    life of the session (17 SmolVLM tiles: 495 MiB peak one by one, 1,086 MiB four at a time)."""
    enc = encoder(bundles["idefics3"], "onnx:fp32")
    assert enc.provider == "CPUExecutionProvider" and enc.spec.max_tiles == 8
    run, batches, shrink = enc.session.run, [], []

    def recording_run(names, feeds, options):
        batches.append(len(feeds[enc.spec.input_name]))
        shrink.append(options.get_run_config_entry("memory.enable_memory_arena_shrinkage"))
        return run(names, feeds, options)

    enc.session.run = recording_run
    enc.encode(np.zeros((5, 3, 32, 32), dtype=np.float32))
    assert batches == [1, 1, 1, 1, 1]
    # and the arena hands each run's activation blocks back (W1 session: resident 576 -> 504 MiB, same speed)
    assert shrink == ["cpu:0"] * 5


@pytest.mark.parametrize("family", FAMILIES)
def test_fp16_cosine(family, ckpts, bundles, pixels):
    ours = encoder(bundles[family], "onnx:fp16").encode(pixels)
    assert ours.dtype == np.float32  # fp32 IO kept
    assert cosine(ours, reference(ckpts, family, pixels)) >= 0.999


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_cosine(family, ckpts, bundles, pixels):
    ours = encoder(bundles[family], "onnx:int8").encode(pixels)
    assert cosine(ours, reference(ckpts, family, pixels)) >= 0.99


def test_cpu_graph_runs_on_the_cpu_provider_and_says_so(bundles):
    import onnxruntime as ort

    manifest = Manifest.load(bundles["llava-clip"])
    enc = encoder(bundles["llava-clip"], "onnx:fp32")
    assert ort.get_available_providers()[-1] == "CPUExecutionProvider"
    assert enc.session.get_providers() == ["CPUExecutionProvider"]  # the CPU-only onnxruntime wheel
    assert enc.provider == "CPUExecutionProvider" and enc.name == "onnxruntime-cpu"
    # the CPU provider runs the graph ORT optimized offline for it, built on this machine and cached; the bundle
    # ships one portable graph per precision
    from edgevlm.runtimes.onnx_encoder import cpu_graph

    artifact = manifest.find("encoder", "onnx:fp32")
    assert enc.session._model_path == str(cpu_graph(bundles["llava-clip"], artifact))
    assert cpu_graph(bundles["llava-clip"], artifact).parent != bundles["llava-clip"] / "encoder"
    assert sorted(p.name for p in (bundles["llava-clip"] / "encoder").glob("*.onnx")) == [
        "fp16.onnx", "fp32.onnx", "int8.onnx"]


def test_forcing_a_provider_this_onnxruntime_lacks_is_refused(bundles):
    manifest = Manifest.load(bundles["llava-clip"])
    with pytest.raises(BackendUnavailableError, match="'cuda' is not available here"):
        OnnxRuntimeEncoder(bundles["llava-clip"], manifest.find("encoder", "onnx:fp32"), manifest.encoder,
                           provider="cuda", threads=1)


def test_forcing_a_missing_provider_is_a_clear_error():
    with pytest.raises(BackendUnavailableError, match="tensorrt.*not available"):
        choose_providers(["CPUExecutionProvider"], "tensorrt")
    assert choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], None)[0] == "CUDAExecutionProvider"
    assert choose_providers(["CPUExecutionProvider", "CoreMLExecutionProvider"], None)[0] == "CoreMLExecutionProvider"


def test_the_onnx_export_keeps_no_reference_to_the_exported_weights(ckpts, tmp_path):
    """onnxscript's rewrite rules keep the last graph they matched, with its weights: the exporter drops that, or the
    fp32 vision tower outlives its release (SmolVLM2-2.2B: 1.66 GB through the int8 quantizers)."""
    import gc
    import weakref

    from edgevlm.export.exporter import build_manifest
    from edgevlm.export.onnx import export_graph

    ckpt = load_checkpoint(ckpts["idefics3"])
    manifest = build_manifest(ckpt, max_tiles=2)
    weights = [weakref.ref(p) for p in ckpt.vision.parameters()]
    export_graph(ckpt.vision, manifest.encoder, tmp_path / "fp32.onnx")
    ckpt.release_weights()
    gc.collect()
    assert sum(w() is not None for w in weights) == 0


def test_releasing_the_decoder_leaves_the_vision_weights_off_the_checkpoint_file(ckpts, pixels):
    """Vision weights copied off the checkpoint's file mapping (so that it can be unmapped), with the same output."""
    ckpt = load_checkpoint(ckpts["idefics3"])
    tiles = torch.from_numpy(pixels[:2])
    with torch.inference_mode():
        before = ckpt.vision(tiles)
    mapped = {p.data_ptr() for p in ckpt.vision.parameters()}
    ckpt.release_decoder()
    assert not mapped & {p.data_ptr() for p in ckpt.vision.parameters()}
    with torch.inference_mode():
        assert torch.equal(ckpt.vision(tiles), before)


@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_graphs_run_attention_as_one_fused_op(family, bundles):
    """The CPU graphs (fp32 and int8) have every attention block as one MultiHeadAttention (MLAS's flash-attention
    kernel: no (heads, tokens, tokens) tensors); their parity with torch is what the tests above check."""
    import onnx

    from edgevlm.onnx_cpu import fuse_attention
    from edgevlm.runtimes.onnx_encoder import cpu_graph

    manifest = Manifest.load(bundles[family])
    for name in ("onnx:fp32", "onnx:int8"):
        artifact = manifest.find("encoder", name)
        assert artifact.details["cpu_attention_fusion"] is True
        optimized = onnx.load(str(cpu_graph(bundles[family], artifact)), load_external_data=False)
        ops = [n.op_type for n in optimized.graph.node]
        original = onnx.load(str(bundles[family] / artifact.path), load_external_data=False)
        layers = sum(n.op_type == "Softmax" for n in original.graph.node)
        assert layers >= 1
        assert ops.count("MultiHeadAttention") == layers and "Softmax" not in ops, (name, sorted(set(ops)))
        assert fuse_attention(original) == layers  # the matcher alone, on the exported graph


def test_attention_is_fused_when_the_export_fixes_batch_and_tokens(ckpts, tmp_path):
    """One tile per run (max_tiles=1): the exporter writes q's reshape as (1, tokens, -1, head_dim), the head count
    left for ONNX Runtime to infer. The matcher takes it from q's projection width; it used to fuse nothing here."""
    import onnx

    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint
    from edgevlm.onnx_cpu import fuse_attention

    bundle = export_checkpoint(ckpts["llava-siglip"], tmp_path / "b", [ArtifactRequest("onnx", "fp32")], [],
                               max_tiles=1)
    artifact = Manifest.load(bundle).find("encoder", "onnx:fp32")
    original = onnx.load(str(bundle / artifact.path), load_external_data=False)
    layers = sum(n.op_type == "Softmax" for n in original.graph.node)
    assert layers >= 1 and artifact.details["cpu_attention_fusion"] is True
    assert fuse_attention(original) == layers
    assert sum(n.op_type == "MultiHeadAttention" for n in original.graph.node) == layers
