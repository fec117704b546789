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


def test_more_tiles_than_the_graph_bound_are_chunked(bundles):
    enc = encoder(bundles["idefics3"], "onnx:fp32")  # exported with max_tiles=8
    many = np.random.default_rng(1).normal(size=(11, 3, 32, 32)).astype(np.float32)
    assert np.allclose(enc.encode(many)[9:], enc.encode(many[9:]), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp16_cosine(family, ckpts, bundles, pixels):
    ours = encoder(bundles[family], "onnx:fp16").encode(pixels)
    assert ours.dtype == np.float32  # fp32 IO kept
    assert cosine(ours, reference(ckpts, family, pixels)) >= 0.999


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_cosine(family, ckpts, bundles, pixels):
    ours = encoder(bundles[family], "onnx:int8").encode(pixels)
    assert cosine(ours, reference(ckpts, family, pixels)) >= 0.99


def test_provider_reported_is_the_one_used(bundles):
    enc = encoder(bundles["llava-clip"], "onnx:fp32")
    assert enc.provider == enc.session.get_providers()[0]
    assert enc.name.startswith("onnxruntime-")


def test_forcing_a_missing_provider_is_a_clear_error():
    with pytest.raises(BackendUnavailableError, match="tensorrt.*not available"):
        choose_providers(["CPUExecutionProvider"], "tensorrt")
    assert choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], None)[0] == "CUDAExecutionProvider"
    assert choose_providers(["CPUExecutionProvider", "CoreMLExecutionProvider"], None)[0] == "CoreMLExecutionProvider"
