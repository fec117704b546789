"""edgevlm plan on Qwen2-VL / Qwen2.5-VL: native-resolution (grid) images, checkpoints and a grid-encoder bundle.
Split from test_plan.py."""
from __future__ import annotations

import json

import pytest

from edgevlm.cli import main as cli_main
from edgevlm.plan import budget
from edgevlm.plan.devices import get_device
from edgevlm.preprocess import PreprocessSpec
from plan_checks import _device_file, _gguf_bytes, plan_without_torch

MIB = 1 << 20

# --- Qwen2-VL / Qwen2.5-VL ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width, height", [(448, 448), (1000, 700), (300, 2000), (20, 30)])
def test_qwen2_vl_image_tokens_are_the_smart_resized_merged_patches(width, height):
    from edgevlm.plan.model import from_preset
    from edgevlm.preprocess import smart_resize

    shapes = from_preset("qwen2-vl-2b")
    h, w = smart_resize(height, width, shapes.preprocess)
    tokens = budget.image_tokens(shapes.layout, shapes.preprocess, width, height)
    assert (tokens.rows, tokens.cols) == (h // 28, w // 28)
    assert tokens.n_tiles == tokens.image_rows == tokens.positions == h * w // 28**2  # one token per 2x2 merged patch
    assert budget.image_tokens(shapes.layout, shapes.preprocess, 448, 448).positions == 256


def test_qwen2_vl_2b_preset_plan():
    from edgevlm.plan.bundle import PlanRequest, plan_model
    from edgevlm.plan.compute import vision_flops_per_tile
    from edgevlm.plan.model import from_preset

    shapes = from_preset("qwen2-vl-2b")
    d, m, layers = 1280, 5120, 32
    block = 4 * d * d + 4 * d + 2 * d * m + m + d + 4 * d  # qkv + proj with biases, fc1/fc2 with biases, 2 LayerNorms
    merger = 2 * d + (4 * d) ** 2 + 4 * d + 4 * d * 1536 + 1536  # ln_q, Linear(4d, 4d), Linear(4d, 1536)
    assert (shapes.vision.params, shapes.vision.projector_params) == (1176 * d + layers * block + merger, merger)
    assert shapes.vision.params == 665_271_296  # transformers' Qwen2VLForConditionalGeneration at these shapes
    assert from_preset("qwen2.5-vl-3b").vision.params == 668_684_288  # Qwen2_5_VL...: SwiGLU 3420, RMSNorm
    assert shapes.decoder.architecture == "qwen2vl" and "output.weight" not in dict(shapes.decoder_tensors)
    result = plan_model(shapes, get_device("jetson-orin-nano-8gb"), PlanRequest(image_size=(448, 448)))
    images = result["images"]
    assert (images["kind"], images["n_tiles"], images["positions"], images["patches"], images["encoder_calls"]) == (
        "grid", 256, 256, 1024, 1)
    weights = {o["decoder"]: o["memory"]["decoder_weights"] for o in result["options"]}
    assert weights["gguf:q4_k_m"] == 980_097_536
    flops = 2 * 1024 * (shapes.vision.params - merger) + 4 * layers * 1024**2 * d + 2 * 256 * merger
    assert result["model"]["vision_gflops_per_image"] * 1e9 == pytest.approx(flops)
    # one image per encoder call, its activations quadratic in the patches: 4x the pixels, ~16x the scores
    bigger = plan_model(shapes, get_device("jetson-orin-nano-8gb"), PlanRequest(image_size=(896, 896)))
    act = {o["encoder"]: o["memory"]["encoder_activations"] for o in result["options"]}
    act_big = {o["encoder"]: o["memory"]["encoder_activations"] for o in bigger["options"]}
    assert 8 < act_big["onnx:fp32"] / act["onnx:fp32"] < 16
    assert result["recommended"] == "onnx:int8 + gguf:q8_0"


@pytest.fixture(scope="module")
def qwen_ckpts(tmp_path_factory):
    import builders

    root = tmp_path_factory.mktemp("qwen")
    return {v: builders.build_qwen2_vl(root / f"qwen{v}", v) for v in ("2", "2.5")}


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_qwen_checkpoint_plan_equals_the_exported_gguf_and_the_family_adapter(qwen_ckpts, version, tmp_path,
                                                                               monkeypatch):
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint
    from edgevlm.families import load_checkpoint
    from edgevlm.manifest import Manifest
    from edgevlm.plan.bundle import PlanRequest, plan_model
    from edgevlm.plan.model import from_checkpoint, from_preset
    from edgevlm.reference import presets

    ckpt = qwen_ckpts[version]
    bundle = export_checkpoint(ckpt, tmp_path / "bundle", [ArtifactRequest("onnx", "fp32")],
                               [ArtifactRequest("gguf", "f32"), ArtifactRequest("gguf", "q8_0")], max_tiles=8)
    manifest = Manifest.load(bundle)
    shapes = from_checkpoint(ckpt)
    # a preset of the tiny checkpoint's shapes (tests/builders.build_qwen2_vl) gives the same decoder and tower
    monkeypatch.setitem(presets.PRESETS, "tiny-qwen", presets.QwenVLShape(
        text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2, text_mlp=128, version=version, vision_hidden=32,
        vision_layers=2, vision_heads=2, vision_mlp=64, vocab=shapes.decoder.vocab_size, tied=False,
        max_pixels=224 * 224))
    preset = from_preset("tiny-qwen")
    assert preset.vision.params == shapes.vision.params
    for planned in (shapes, preset):
        result = plan_model(planned, get_device("rtx-4060-8gb"), PlanRequest(context=512, image_size=(100, 60)))
        weights = {o["decoder"]: o["memory"]["decoder_weights"] for o in result["options"]}
        for precision in ("f32", "q8_0"):
            path = bundle / manifest.find("decoder", f"gguf:{precision}").path
            assert weights[f"gguf:{precision}"] == _gguf_bytes(path)
        assert result["images"]["positions"] == 4 * 2  # 100x60 -> 112x56: 4x2 merged patches
    # the torch-free reading agrees with the family's load()
    loaded = load_checkpoint(ckpt)
    assert shapes.layout == loaded.layout and shapes.family == loaded.family
    assert shapes.vision.params == sum(p.numel() for p in loaded.vision.parameters())
    assert shapes.decoder_params == sum(p.numel() for n, p in loaded.decoder.named_parameters() if ".layers." in n)
    for field in ("resize_rule", "tile_size", "patch_size", "temporal_patch_size", "merge_size", "min_pixels",
                  "max_pixels"):
        assert getattr(shapes.preprocess, field) == getattr(loaded.preprocess, field), field
    # the bundle plans too (a grid encoder used to be refused): the same decoder bytes and image tokens
    from edgevlm.plan.bundle import plan_bundle

    planned = plan_bundle(bundle, get_device("rtx-4060-8gb"), PlanRequest(context=512, image_size=(100, 60)))
    assert {o["decoder"]: o["memory"]["decoder_weights"] for o in planned["options"]} == {
        name: weights[name] for name in ("gguf:f32", "gguf:q8_0")}
    assert planned["images"]["positions"] == 8


def test_qwen_checkpoint_plan_does_not_import_torch(qwen_ckpts):
    result = plan_without_torch(qwen_ckpts["2.5"])
    assert result["model"]["family"] == "qwen2_vl" and result["images"]["positions"] == 64  # 224x224: max_pixels
    assert result["recommendation"]["status"] == "fits"


# --- a Qwen2-VL / Qwen2.5-VL bundle (grid encoder) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_bundle(qwen_ckpts, tmp_path_factory):
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint

    return export_checkpoint(qwen_ckpts["2.5"], tmp_path_factory.mktemp("qwen-bundle") / "bundle",
                             [ArtifactRequest("onnx", "fp32"), ArtifactRequest("onnx", "int8")],
                             [ArtifactRequest("gguf", "q8_0")], max_tiles=8)


PLAN_ITEMS = ("decoder_weights", "encoder_weights", "encoder_activations", "kv_cache", "compute_buffer", "caches",
              "runtime_overhead", "margin")


def _plan_json(capsys, *args: str) -> dict:
    assert cli_main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_grid_activation_fit_on_hand_values():
    # 10 B per patch + 0.5 B per patch^2: 100 patches 6,000 B, 400 patches 84,000 B
    assert budget.grid_activation_fit([(400, 84_000), (100, 6_000)]) == pytest.approx((10.0, 0.5))
    assert budget.grid_activation_bytes([(100, 6_000), (400, 84_000)], 1000) == 10 * 1000 + 500_000
    # noise: a falling per-patch figure drops the quadratic term (the larger per-patch rate, linear)
    assert budget.grid_activation_fit([(100, 6_000), (400, 20_000)]) == (60.0, 0.0)
    # a negative linear term: all quadratic, through the larger measurement
    assert budget.grid_activation_fit([(100, 0), (400, 160_000)]) == (0.0, 1.0)
    assert budget.grid_activation_fit([(400, 8_000)]) == (20.0, 0.0)  # one point: linear
    with pytest.raises(ValueError):
        budget.grid_activation_fit([])


def test_qwen_bundle_plan_itemises_every_option(qwen_bundle, qwen_ckpts, capsys):
    """A grid-encoder bundle plans from its own files: image tokens from the manifest's smart_resize (the session's
    own count and the encoder's own rows), decoder bytes from the GGUF, encoder weights from the ONNX files (ORT's
    resident bytes on a CPU), activations from the export's two-size probe, TTFT from the source checkpoint's tower."""
    from PIL import Image

    import edgevlm
    from edgevlm.manifest import Manifest
    from edgevlm.plan.compute import vision_flops_per_tile
    from edgevlm.plan.model import from_checkpoint
    from edgevlm.preprocess import preprocess

    manifest = Manifest.load(qwen_bundle)
    session = edgevlm.load(qwen_bundle, encoder="onnx:fp32", decoder="gguf:q8_0")
    gguf = _gguf_bytes(qwen_bundle / manifest.find("decoder", "gguf:q8_0").path)
    for width, height in ((100, 60), (300, 200)):
        image = Image.new("RGB", (width, height), "red")
        rows = session._prepare_image(image).n_rows_embedded
        pre = preprocess(image, manifest.preprocess)
        assert session.encoder.encode(pre.pixel_values, grid=pre.grid).shape[0] == rows
        result = _plan_json(capsys, str(qwen_bundle), "--device", "raspberry-pi-5-8gb", "--image-size",
                            f"{width}x{height}")
        images = result["images"]
        assert images["kind"] == "grid" and images["n_tiles"] == images["image_rows"] == images["positions"] == rows
        assert images["text_tokens_exact"] and images["patches"] == 4 * rows and images["encoder_calls"] == 1
        assert [(o["encoder"], o["decoder"]) for o in result["options"]] == [("onnx:fp32", "gguf:q8_0"),
                                                                              ("onnx:int8", "gguf:q8_0")]
        for option in result["options"]:
            memory = option["memory"]
            assert set(PLAN_ITEMS) | {"needed", "total"} == set(memory)
            assert all(isinstance(memory[k], int) and memory[k] >= 0 for k in memory)
            assert memory["decoder_weights"] == gguf
            artifact = manifest.find("encoder", option["encoder"])
            assert memory["encoder_weights"] == artifact.details.get("session_resident_bytes",
                                                                     memory["encoder_weights"]) > 0
            patches = images["patches"]
            embeddings = rows * manifest.encoder.output_shape[1] * 4
            pixels = budget.patch_input_bytes(patches, manifest.preprocess)
            points = artifact.details.get("activation_bytes_at_patches")
            if points:  # measured at export (Linux)
                assert memory["encoder_activations"] == budget.grid_activation_bytes(points, patches) + embeddings + pixels
            assert option["verdict"] == "fits" and option["decode_tok_s"] > 0
            assert option["ttft"]["ttft_s"] is None  # the Pi 5 has no compute figure in the table
        gpu = _plan_json(capsys, str(qwen_bundle), "--device", "rtx-4060-8gb", "--image-size", f"{width}x{height}")
        for option in gpu["options"]:  # the source checkpoint is here: encode + prefill
            assert option["ttft"]["prefill_s"] > 0 and option["ttft"]["encode_s"] > 0
        vision = from_checkpoint(qwen_ckpts["2.5"]).vision.at_patches(images["patches"], 2)
        assert result["vision"]["gflops_per_image"] * 1e9 == pytest.approx(vision_flops_per_tile(vision))
        assert "quadratic" in result["basis"]["encoder_activations"]
        assert result["recommendation"]["status"] == "fits"
    # the default image is the largest max_pixels keeps (224x224 here: 64 tokens); a GPU target counts the ONNX files
    result = _plan_json(capsys, str(qwen_bundle), "--device", "rtx-4060-8gb")
    assert (result["images"]["width"], result["images"]["positions"]) == (224, 224 // 28 * 224 // 28)
    for option in result["options"]:
        artifact = manifest.find("encoder", option["encoder"])
        sizes = {f.path: f.bytes for f in artifact.files}
        assert option["memory"]["encoder_weights"] == sizes[artifact.path] + sizes.get(f"{artifact.path}.data", 0)
    assert cli_main(["plan", str(qwen_bundle), "--device", "rtx-4060-8gb", "--max-tiles", "4"]) == 2
    assert "has no tiles: pass a smaller --image-size instead" in capsys.readouterr().err
    assert cli_main(["plan", str(qwen_bundle), "--device", "rtx-4060-8gb"]) == 0  # the table for people
    assert "image tokens" in capsys.readouterr().out


@pytest.mark.skipif(not __import__("pathlib").Path("/proc/self/status").is_file(), reason="the probes read /proc")
def test_grid_encoder_activations_are_measured_at_export_at_two_sizes(qwen_bundle):
    from edgevlm.manifest import Manifest

    manifest = Manifest.load(qwen_bundle)
    for artifact in (a for a in manifest.artifacts if a.format == "onnx"):
        (small, small_bytes), (large, large_bytes) = artifact.details["activation_bytes_at_patches"]
        # the tiny tower's largest probe grid: 30x30 patches (the graph's bound, 928), and 14x14
        assert (small, large) == (14 * 14, 30 * 30) and 0 <= small_bytes < large_bytes
        assert artifact.details["session_resident_bytes"] > 0
        assert "peak RSS one image of 196 and then 900 patches" in artifact.details["activation_basis"]


def test_qwen_bundle_without_its_source_plans_prefill_only_ttft(qwen_bundle, tmp_path, capsys):
    """Without the source checkpoint the tower's depth and width are unknown: TTFT is the prefill, said so; the
    memory items do not change (activations measured at export, or the per-pixel fallback where not)."""
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(qwen_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["source"]["path"] = str(tmp_path / "gone")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    args = ("--device", "rtx-4060-8gb", "--image-size", "300x200")
    with_source, without = _plan_json(capsys, str(qwen_bundle), *args), _plan_json(capsys, str(copy), *args)
    for a, b in zip(with_source["options"], without["options"]):
        assert a["memory"] == b["memory"]
        assert b["ttft"]["encode_s"] is None and b["ttft"]["ttft_s"] is None
        assert b["ttft"]["prefill_s"] == pytest.approx(a["ttft"]["prefill_s"])
        assert "TTFT is the prefill only" in b["ttft"]["basis"]
    assert without["vision"] == {"kind": "grid", "shapes_from": None, "gflops_per_image": None}
    assert "TTFT is the prefill only" in without["basis"]["ttft"]
    # no measured points either: the per-pixel fallback, linear, labelled
    for artifact in manifest["artifacts"]:
        artifact["details"].pop("activation_bytes_at_patches", None)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    fallback = _plan_json(capsys, str(copy), *args)
    patches = fallback["images"]["patches"]
    rows = fallback["images"]["image_rows"]
    extra = rows * 64 * 4 + budget.patch_input_bytes(patches, PreprocessSpec.from_dict(manifest["preprocess"]))
    assert fallback["options"][0]["memory"]["encoder_activations"] == 788 * patches * 14 * 14 + extra
    assert "fallback, not measured" in fallback["basis"]["encoder_activations"]


def test_run_warns_at_start_on_a_grid_bundle(qwen_bundle, tmp_path, capsys):
    """The start-up fit check plans a grid bundle too (it used to skip it silently: plan_bundle refused it)."""
    import psutil
    from PIL import Image

    from edgevlm.plan.fit import fit_warning

    tiny = get_device("fake-gpu", _device_file(tmp_path, 1 << 20, memory_gib=1))
    warning = fit_warning(qwen_bundle, tiny, "onnx:int8", "gguf:q8_0")
    assert warning.startswith("warning: onnx:int8 + gguf:q8_0 at context ") and "MiB is available here" in warning
    assert fit_warning(qwen_bundle, get_device("rtx-4090-24gb"), "onnx:int8", "gguf:q8_0") is None
    image = tmp_path / "red.png"
    Image.new("RGB", (100, 60), "red").save(image)
    base = ["run", str(qwen_bundle), "--image", str(image), "--prompt", "What is it?", "--max-tokens", "2",
            "--encoder", "onnx:int8", "--decoder", "gguf:q8_0"]
    assert cli_main(base) == 0
    assert "warning:" not in capsys.readouterr().err
    too_big = int(psutil.virtual_memory().total / MIB * 2)
    assert cli_main(base + ["--prefix-cache-mb", str(too_big)]) == 0
    assert "warning: onnx:int8 + gguf:q8_0 at context" in capsys.readouterr().err


def test_plan_png_title_counts_image_tokens_of_a_native_resolution_image(qwen_bundle, capsys):
    """The W3 PNG labelled one 448x448 image "256 tiles"; they are 256 image tokens of one image."""
    from edgevlm.commands.plan import png_title

    result = _plan_json(capsys, str(qwen_bundle), "--device", "jetson-orin-nano-8gb", "--image-size", "448x448")
    line1, line2 = png_title(result).split("\n")
    assert line1.endswith("on " + result["device"]["name"])
    assert line2 == f"context {result['context']}, 1 x 448x448 ({result['images']['n_tiles']} image tokens each)"
