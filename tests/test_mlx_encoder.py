"""The MLX vision encoder (`--encoder mlx:*`: mlx-vlm's vision modules with the checkpoint's weights) on mlx[cpu],
against the PyTorch vision module per tile and, end to end, against the ONNX fp32 encoder's greedy tokens on real
llama.cpp and MLX decoders. Tiny models are built in the session; the trained reference model where it is cached."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("mlx.core", reason="MLX is not installed on this platform (pip install 'mlx[cpu]')")

import edgevlm  # noqa: E402
from edgevlm.errors import BadInputError  # noqa: E402
from edgevlm.export.exporter import ArtifactRequest, export_checkpoint  # noqa: E402
from edgevlm.manifest import Manifest  # noqa: E402
from edgevlm.metrics import ENCODER_GATES, cosine, max_rel_err, nmse, worst_tile  # noqa: E402

FAMILIES = ("smolvlm2", "llava-clip")  # a tiny SmolVLM (family idefics3) and a tiny LLaVA with the reference's CLIP
MLX_ENCODERS = [ArtifactRequest("mlx", p) for p in ("fp32", "fp16", "8bit")]


@pytest.fixture(scope="module")
def mlx_encoder_bundles(ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("mlx-encoder")
    # mlx:fp32 names both an encoder and a decoder here: artifact names are unique per role
    decoders = [ArtifactRequest("gguf", "f32"), ArtifactRequest("mlx", "fp32")]
    return {name: export_checkpoint(ckpts[name], root / name, [ArtifactRequest("onnx", "fp32"), *MLX_ENCODERS],
                                    decoders, max_tiles=4, options={"group_size": 32})
            for name in FAMILIES}


def _probe(manifest, n: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *manifest.encoder.input_shape[1:])).astype(np.float32)


@pytest.mark.parametrize("family", FAMILIES)
def test_mlx_encoders_match_the_pytorch_vision_module_per_tile(family, mlx_encoder_bundles):
    import torch

    from edgevlm.runtimes.bundle_loader import make_encoder, source_checkpoint

    bundle = mlx_encoder_bundles[family]
    manifest = Manifest.load(bundle)
    pixels = _probe(manifest)
    with torch.inference_mode():
        ref = source_checkpoint(manifest).vision(torch.from_numpy(pixels)).numpy()
    outs = {}
    for request in MLX_ENCODERS:
        encoder = make_encoder(bundle, manifest, request.name)
        assert encoder.name == "mlx-cpu" and encoder.precision == request.precision
        outs[request.precision] = out = encoder.encode(pixels)
        assert out.shape == ref.shape and out.dtype == np.float32
        tiles = [cosine(o, r) for o, r in zip(out, ref)]
        print(f"{family} {request.name}: worst cosine {min(tiles):.7f}, max_rel_err {max_rel_err(out, ref):.2e}")
        assert min(tiles) >= 0.999  # every tile
    assert max_rel_err(outs["fp32"], ref) <= ENCODER_GATES["fp32"].threshold  # MLX fp32 is exact: 4e-7 measured
    assert worst_tile(outs["fp16"], ref)["cosine"] >= ENCODER_GATES["fp16"].threshold
    assert max_rel_err(outs["8bit"], ref) > max_rel_err(outs["fp16"], ref)  # the 8-bit weights are really quantized
    # several tiles per MLX call and one tile per call give the same rows
    one_by_one = np.concatenate([encoder.encode(pixels[i : i + 1]) for i in range(len(pixels))])
    np.testing.assert_allclose(encoder.encode(pixels), one_by_one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("decoder", ["gguf:f32", "mlx:fp32"])
def test_answers_with_the_mlx_encoder_equal_the_onnx_fp32_encoders(family, decoder, mlx_encoder_bundles, images):
    """Greedy tokens through a real decoder (llama.cpp in parity mode, MLX): the MLX fp32 encoder's equal the ONNX
    fp32 encoder's; the fp16 encoder's wherever the ONNX answer's top two logits are apart by more than fp16 noise
    (random weights leave near-ties: on the tiny LLaVA one token of 12 flips; the trained reference model's answers
    are compared exactly below). The answers depend on the image, so the encoder is what is compared."""
    from PIL import Image

    bundle, prompt = mlx_encoder_bundles[family], "Look: <image> what colour is the circle?"
    sessions = {name: edgevlm.load(bundle, encoder=name, decoder=decoder, parity=True, threads=1)
                for name in ("onnx:fp32", "mlx:fp32", "mlx:fp16")}
    red = Image.new("RGB", (64, 64), (255, 0, 0))  # on the tiny LLaVA, random-noise images all give one answer
    answers = []
    for image in (images["small"], red):
        onnx = sessions["onnx:fp32"].generate([image], prompt, max_tokens=12, stop_token_ids=[], return_logits=True)
        assert sessions["mlx:fp32"].generate([image], prompt, max_tokens=12, stop_token_ids=[]).tokens == onnx.tokens
        logits = sessions["mlx:fp16"].teacher_forced_logits([image], prompt, onnx.tokens)
        assert nmse(np.stack(logits), np.stack(onnx.logits)) <= 1e-4
        for ours, theirs, token in zip(logits, onnx.logits, onnx.tokens):
            top2 = np.sort(theirs)[-2:]
            if top2[1] - top2[0] > 0.05:
                assert int(np.argmax(ours)) == token
        answers.append(onnx.tokens)
    assert answers[0] != answers[1]  # discriminative: the image changes the answer


def test_a_family_without_an_mlx_vision_tower_is_refused_before_loading(ckpts, tmp_path):
    with pytest.raises(BadInputError, match=r"idefics3, llava only .* export --encoder onnx"):
        export_checkpoint(ckpts["internvl"], tmp_path / "b", [ArtifactRequest("mlx", "fp16")], [])
    # a supported family whose tower mlx-vlm's module would compute differently: LLaVA with SigLIP
    with pytest.raises(BadInputError, match="SigLIP"):
        export_checkpoint(ckpts["llava-siglip"], tmp_path / "c", [ArtifactRequest("mlx", "fp16")], [])
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_the_manifest_records_the_vision_half_and_its_quantization(mlx_encoder_bundles):
    bundle = mlx_encoder_bundles["smolvlm2"]
    manifest = Manifest.load(bundle)
    encoder = manifest.find("encoder", "mlx:8bit")
    assert encoder.format == "mlx" and manifest.find("decoder", "mlx:fp32").role == "decoder"
    config = json.loads((bundle / encoder.path / "config.json").read_text())
    assert config["family"] == "idefics3" and config["quantization"]["bits"] == 8
    assert encoder.details["quantization"]["layers"] >= 1 and encoder.details["dtype"] == "float16"


def test_the_mlx_encoder_imports_neither_torch_nor_transformers(mlx_encoder_bundles):
    """What a Mac's runtime loads for `--encoder mlx:*`: mlx and mlx-vlm's vision modules only."""
    script = (
        "import json, sys, numpy as np\n"
        "from pathlib import Path\n"
        "from edgevlm.manifest import Manifest\n"
        "from edgevlm.runtimes.bundle_loader import make_encoder\n"
        f"b = Path({str(mlx_encoder_bundles['llava-clip'])!r}); m = Manifest.load(b)\n"
        "e = make_encoder(b, m, 'mlx:8bit')\n"
        "out = e.encode(np.zeros((1, *m.encoder.input_shape[1:]), np.float32))\n"
        "print(json.dumps({'shape': list(out.shape), 'heavy': sorted(k for k in sys.modules if k.split('.')[0] in "
        "('torch', 'transformers', 'cv2', 'datasets', 'mlx_lm'))}))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [] and report["shape"][0] == 1


def test_verify_judges_the_mlx_encoders(mlx_encoder_bundles):
    """fp32 MLX is judged on any weights; fp16/8bit are measured and left unjudged on random weights."""
    from edgevlm.verify import verify_report

    rows = {r["artifact"]: r for r in verify_report(mlx_encoder_bundles["llava-clip"], threads=1, decoders=False)["rows"]}
    assert rows["mlx:fp32"]["status"] == "pass"
    assert rows["mlx:fp16"]["status"] == "unjudged" and rows["mlx:8bit"]["status"] == "unjudged"
    assert rows["mlx:8bit"]["checks"][0]["value"] >= 0.999


@pytest.mark.slow
def test_verify_passes_the_mlx_encoders_of_the_trained_reference_model(tmp_path):
    """The reference model (a LLaVA with a CLIP tower; mlx-vlm's llava vision module): every MLX encoder passes its
    gate, and its pair with the exact GGUF decoder passes too."""
    from edgevlm.reference.train import DEFAULT_RECIPE, ensure_reference
    from edgevlm.verify import verify_report

    bundle = export_checkpoint(ensure_reference(DEFAULT_RECIPE), tmp_path / "ref",
                               [ArtifactRequest("onnx", "fp32"), ArtifactRequest("mlx", "fp16"),
                                ArtifactRequest("mlx", "8bit")], [ArtifactRequest("gguf", "f32")], max_tiles=4)
    report = verify_report(bundle, threads=1)
    rows = {r["artifact"]: r for r in report["rows"]}
    assert report["weights"]["trained"]
    for name in ("mlx:fp16", "mlx:8bit", "mlx:fp16 + gguf:f32", "mlx:8bit + gguf:f32"):
        assert rows[name]["status"] == "pass", rows[name]
    assert rows["mlx:fp16"]["checks"][0]["value"] >= 0.9999  # cosine, worst of 5 tiles
    from edgevlm.reference import scenes

    sessions = {name: edgevlm.load(bundle, encoder=name, decoder="gguf:f32", parity=True, threads=1)
                for name in ("onnx:fp32", "mlx:fp16", "mlx:8bit")}
    answers = []
    for seed in range(4_100_000_000, 4_100_000_004):  # held-out scenes: identical greedy answers
        image = scenes.render(scenes.make_scene(seed))
        tokens = {n: s.generate([image], "Describe the image.", max_tokens=24).tokens for n, s in sessions.items()}
        assert tokens["mlx:fp16"] == tokens["onnx:fp32"] == tokens["mlx:8bit"]
        answers.append(tokens["onnx:fp32"])
    assert len({tuple(a) for a in answers}) > 1  # the scenes' answers differ: the image is read


def test_every_encoder_backend_is_an_edge_of_the_import_graph():
    """The backends are imported when chosen, by plain import statements: the layering checks see them."""
    from test_layering import import_graph

    edges = import_graph()["edgevlm.runtimes.bundle_loader"]
    assert {"edgevlm.runtimes.onnx_encoder", "edgevlm.runtimes.tensorrt_encoder", "edgevlm.runtimes.mlx_encoder"} <= edges
    assert "edgevlm.mlx_vision" in import_graph()["edgevlm.runtimes.mlx_encoder"]
