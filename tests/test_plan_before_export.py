"""edgevlm plan before export (checkpoints and presets), its TTFT, `export --for` and the recommendation: what to
lower first. Split from test_plan.py."""
from __future__ import annotations

import json
import re

import pytest

from edgevlm.cli import main as cli_main
from edgevlm.errors import BadInputError
from edgevlm.plan.devices import get_device, this_machine
from plan_checks import _device_file, _gguf_bytes, plan_without_torch


# --- before export: checkpoints and presets -----------------------------------------------------------------------

TINY_IDEFICS3 = dict(text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2, text_mlp=128, vision_hidden=32,
                     vision_layers=2, vision_heads=2, vision_mlp=64, patch=8, image=32, scale_factor=2, vocab=400,
                     tied=False)  # tests/builders.build_idefics3's shapes


def test_preset_and_checkpoint_decoder_bytes_equal_the_exported_gguf(bundles, ckpts, monkeypatch):
    """The decoder bytes a plan gives before export, per quantization, are the tensor bytes of the GGUF the exporter
    then writes: from the checkpoint's safetensors headers, and from a preset of the same shapes."""
    from edgevlm.manifest import Manifest
    from edgevlm.plan.bundle import plan_model, PlanRequest
    from edgevlm.plan.model import from_checkpoint, from_preset
    from edgevlm.reference import presets

    monkeypatch.setitem(presets.PRESETS, "tiny-idefics3", presets.SmolVLMShape(**TINY_IDEFICS3))
    manifest = Manifest.load(bundles["idefics3"])
    device = get_device("rtx-4060-8gb")
    for shapes in (from_checkpoint(ckpts["idefics3"]), from_preset("tiny-idefics3")):
        options = plan_model(shapes, device, PlanRequest(context=256))["options"]
        weights = {o["decoder"]: o["memory"]["decoder_weights"] for o in options}
        for precision in ("f32", "q8_0"):
            assert weights[f"gguf:{precision}"] == _gguf_bytes(bundles["idefics3"] / manifest.find("decoder", f"gguf:{precision}").path)
    # the vision parameter count a preset's formula gives = the checkpoint's vision tensors (headers)
    assert from_preset("tiny-idefics3").vision.params == from_checkpoint(ckpts["idefics3"]).vision.params


def test_smolvlm_256m_preset_gives_the_real_files_q4_k_m_bytes():
    from edgevlm.plan.bundle import plan_model, PlanRequest
    from edgevlm.plan.model import from_preset

    result = plan_model(from_preset("smolvlm-256m"), get_device("jetson-orin-nano-8gb"), PlanRequest())
    weights = {o["decoder"]: o["memory"]["decoder_weights"] for o in result["options"]}
    assert weights["gguf:q4_k_m"] == 103_746_816  # the tensor bytes of the benchmarks' w1 bundle's q4_k_m GGUF
    assert list(weights) == [f"gguf:{p}" for p in ("f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")]
    assert (result["images"]["n_tiles"], result["images"]["positions_per_image"]) == (17, 1128)
    assert {o["encoder"] for o in result["options"]} == {"onnx:fp32", "onnx:fp16", "onnx:int8"}
    assert "estimate, not measured" in result["basis"]["encoder_activations"]


@pytest.mark.parametrize("name", ["llava-clip", "idefics3", "internvl", "llava-qwen2-tied", "smolvlm2"])
def test_checkpoint_shapes_match_the_family_adapter(ckpts, name):
    """plan/model.py reads a checkpoint without torch (the family's describe() plus the safetensors headers); the
    family's load() must agree on the decoder, the preprocessing, the layout and the vision parameters."""
    from edgevlm.families import load_checkpoint
    from edgevlm.plan import model

    shapes = model.from_checkpoint(ckpts[name])
    ckpt = load_checkpoint(ckpts[name])
    config = ckpt.decoder.config
    assert (shapes.decoder.hidden_size, shapes.decoder.n_layers, shapes.decoder.n_heads, shapes.decoder.n_kv_heads,
            shapes.decoder.intermediate_size, shapes.decoder.vocab_size, shapes.decoder.context_length) == (
        config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
        config.intermediate_size, config.vocab_size, ckpt.context_length)
    assert shapes.decoder.tie_word_embeddings == (ckpt.decoder.lm_head.weight.data_ptr()
                                                  == ckpt.decoder.model.embed_tokens.weight.data_ptr())
    assert shapes.layout == ckpt.layout
    for field in ("resize_rule", "tile_size", "shortest_edge", "longest_edge", "image_splitting", "max_tiles",
                  "min_tiles"):
        assert getattr(shapes.preprocess, field) == getattr(ckpt.preprocess, field), field
    assert shapes.vision.params == sum(p.numel() for p in ckpt.vision.parameters())
    assert shapes.decoder_params == sum(p.numel() for n, p in ckpt.decoder.named_parameters() if ".layers." in n)


def test_checkpoint_plan_does_not_import_torch(ckpts):
    result = plan_without_torch(ckpts["idefics3"])
    assert result["model"]["source"] == "checkpoint" and len(result["options"]) == 21


def test_plan_input_is_one_of_bundle_checkpoint_or_preset(tmp_path, capsys):
    assert cli_main(["plan", "--preset", "nope", "--device", "rtx-4060-8gb"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'nope'; known presets:" in err and "smolvlm-256m" in err and "llava-1.5-7b" in err
    assert cli_main(["plan", "--device", "rtx-4060-8gb"]) == 2
    assert "plan one thing" in capsys.readouterr().err
    assert cli_main(["plan", str(tmp_path), "--preset", "smolvlm-256m", "--device", "rtx-4060-8gb"]) == 2
    assert "plan one thing" in capsys.readouterr().err
    assert cli_main(["plan", str(tmp_path), "--device", "rtx-4060-8gb"]) == 2
    assert "neither a bundle (manifest.json) nor a checkpoint folder (config.json)" in capsys.readouterr().err
    assert cli_main(["plan", "--preset", "llava-1.5-7b", "--device", "rtx-4060-8gb", "--context", "8192"]) == 2
    assert "more than this model supports (4096 positions)" in capsys.readouterr().err


# --- TTFT ----------------------------------------------------------------------------------------------------------


def test_ttft_arithmetic_on_a_hand_example():
    from edgevlm.plan.compute import Compute, prefill_flops, ttft, vision_flops_per_tile
    from edgevlm.plan.model import VisionShape

    vision = VisionShape(params=1000, projector_params=100, layers=2, width=8, mlp=32, heads=2, sequence=10,
                         tokens_out=5)
    assert vision_flops_per_tile(vision) == 2 * 10 * 900 + 4 * 2 * 10 * 10 * 8 + 2 * 5 * 100 == 25_400
    assert prefill_flops(106_000_000, 1000) == 212_000_000_000
    compute = Compute(1e12, {"int8": 0.5}, 0.25, "hand")
    t = ttft(compute, 10**11, 3, 2 * 10**11, "int8")  # 3e11 / 5e11 + 2e11 / 2.5e11
    assert (t["encode_s"], t["prefill_s"], t["ttft_s"]) == (pytest.approx(0.6), pytest.approx(0.8), pytest.approx(1.4))
    assert ttft(None, 10**11, 3, 10**11, "int8")["ttft_s"] is None
    unknown = ttft(compute, None, 3, 2 * 10**11, "int8")  # a bundle without its source checkpoint: prefill only
    assert unknown["ttft_s"] is None and unknown["prefill_s"] == pytest.approx(0.8)


def test_ttft_in_the_plan_uses_the_device_compute(capsys):
    from edgevlm.plan.compute import EFFICIENCY_PEAK, device_compute

    assert cli_main(["plan", "--preset", "smolvlm-256m", "--device", "rtx-4060-8gb", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    model, images = result["model"], result["images"]
    flops = 30.2e12 * EFFICIENCY_PEAK  # the table's dense FP16 figure x the published-peak efficiency
    positions = images["positions"] + 24  # one image's positions + the default prompt
    assert result["ttft_prompt_positions"] == positions
    for option in result["options"]:
        t = option["ttft"]
        assert t["encode_s"] == pytest.approx(model["vision_gflops_per_tile"] * 1e9 * 17 / flops)
        assert t["prefill_s"] == pytest.approx(2 * model["decoder_params"] * positions / flops)
        assert t["ttft_s"] == pytest.approx(t["encode_s"] + t["prefill_s"])
    assert device_compute(get_device("raspberry-pi-5-8gb")) is None  # no published compute: no TTFT
    measured = device_compute(this_machine(bandwidth_gbs=10.0, matmul_gflops=100.0))
    assert measured.flops == 1e11 and measured.encode_efficiency["int8"] == 2.0 and measured.prefill_efficiency == 0.4


def test_matmul_probe_is_quick():
    import time

    from edgevlm.plan.compute import measure_matmul_gflops

    start = time.perf_counter()
    gflops = measure_matmul_gflops()
    assert gflops > 0.1 and time.perf_counter() - start < 1.5  # ~0.1 s idle, ~0.4 s on shared cores


# --- export --for ----------------------------------------------------------------------------------------------------


def _small_gpu(tmp_path, ckpt, between: tuple[str, str]) -> str:
    """A device file whose one GPU has room for the plan's int8 + `between[1]` option but not int8 + `between[0]`."""
    from edgevlm.plan.bundle import PlanRequest, plan_model
    from edgevlm.plan.model import from_checkpoint

    entry = {"id": "tiny-gpu", "name": "a small GPU", "kind": "discrete-gpu", "memory_gib": 4, "usable_gib": 4,
             "usable_basis": "test", "bandwidth_gbs": 100, "target": "cuda", "sources": ["test"],
             "compute": {"fp16_tflops": 10.0}}
    path = tmp_path / "devices.json"
    path.write_text(json.dumps({"version": 1, "devices": [entry]}))
    plan = plan_model(from_checkpoint(ckpt), get_device("tiny-gpu", path), PlanRequest())
    total = {(o["encoder"], o["decoder"]): o["memory"]["total"] for o in plan["options"]}
    bigger, smaller = (total[("onnx:int8", f"gguf:{p}")] for p in between)
    assert smaller < bigger
    entry["usable_gib"] = (bigger - 1) / (1 << 30)
    path.write_text(json.dumps({"version": 1, "devices": [entry]}))
    return str(path)


def test_export_for_picks_the_smaller_quant_when_the_bigger_does_not_fit(ckpts, tmp_path, capsys):
    from edgevlm.plan.for_device import plan_for_device
    from edgevlm.manifest import Manifest

    def choose_for_device(*args):
        chosen = plan_for_device(*args)
        return chosen["encoder"], chosen["decoder"], chosen["line"]

    ckpt = str(ckpts["idefics3"])
    devices = _small_gpu(tmp_path, ckpt, ("f16", "q8_0"))
    encoder, decoder, line = choose_for_device(ckpt, "tiny-gpu", devices, None, None)
    assert decoder == "gguf:q8_0" and encoder in ("onnx:fp32", "onnx:fp16", "onnx:int8")
    assert line.startswith("for tiny-gpu at context 512, 5 tile(s): gguf:q8_0 + ")
    assert re.search(r"gguf:f16 needs [\d,]+ MiB: (tight|does not fit)", line)  # the reason the bigger was passed over
    # an explicit --decoder wins, and the line says so
    encoder2, decoder2, line2 = choose_for_device(ckpt, "tiny-gpu", devices, None, "gguf:q4_0")
    assert (encoder2, decoder2) == (encoder, "gguf:q4_0") and "--decoder gguf:q4_0 as given (the plan chose gguf:q8_0)" in line2
    out = tmp_path / "bundle"
    assert cli_main(["export", ckpt, "-o", str(out), "--for", "tiny-gpu", "--device-file", devices, "--max-tiles", "5"]) == 0
    assert line in capsys.readouterr().out
    names = {a.name for a in Manifest.load(out).artifacts}
    assert {encoder, "gguf:q8_0"} <= names and "gguf:f16" not in names


def test_export_for_refuses_when_nothing_fits(ckpts, tmp_path, capsys):
    entry = {"id": "no-room", "name": "no room", "kind": "discrete-gpu", "memory_gib": 1, "usable_gib": 0.1,
             "usable_basis": "test", "bandwidth_gbs": 100, "target": "cuda", "sources": ["test"]}
    path = tmp_path / "devices.json"
    path.write_text(json.dumps({"version": 1, "devices": [entry]}))
    assert cli_main(["export", str(ckpts["idefics3"]), "-o", str(tmp_path / "b"), "--for", "no-room", "--device-file",
                     str(path)]) == 2
    err = capsys.readouterr().err
    assert "nothing fits no-room" in err and not (tmp_path / "b").exists()
    assert "nor lowered to 1 tile(s) and 512 positions" in err and len(err.strip().splitlines()) == 1
    assert cli_main(["export", str(ckpts["idefics3"]), "-o", str(tmp_path / "b"), "--for", "nope"]) == 2
    assert "unknown device 'nope'" in capsys.readouterr().err


# --- the recommendation: what to lower first ----------------------------------------------------------------------


def _smallest_total(preset: str, device_file: str, **request) -> int:
    from edgevlm.plan.bundle import PlanRequest, plan_model
    from edgevlm.plan.model import from_preset

    plan = plan_model(from_preset(preset), get_device("fake-gpu", device_file), PlanRequest(**request))
    return min(o["memory"]["total"] for o in plan["options"])


def _recommend(capsys, preset: str, device_file: str, *more: str) -> dict:
    assert cli_main(["plan", "--preset", preset, "--device", "fake-gpu", "--device-file", device_file, "--json",
                     *more]) == 0
    return json.loads(capsys.readouterr().out)


def test_recommendation_fits_as_asked(tmp_path, capsys):
    result = _recommend(capsys, "smolvlm-256m", _device_file(tmp_path, 12 << 30))
    rec = result["recommendation"]
    assert rec["status"] == "fits" and rec["changes"] == [] and rec["settings"] == rec["asked"]
    assert f"{rec['encoder']} + {rec['decoder']}" == result["recommended"] == "onnx:fp32 + gguf:f32"
    assert rec["settings"]["tiles"] == 17 and rec["settings"]["context"] == 4096
    assert cli_main(["plan", "--preset", "smolvlm-256m", "--device", "fake-gpu", "--device-file",
                     _device_file(tmp_path, 12 << 30)]) == 0
    assert "recommendation: onnx:fp32 + gguf:f32 fits as asked (context 4,096, 17 tile(s))" in capsys.readouterr().out


def test_recommendation_lowers_the_tile_cap_first(tmp_path, capsys):
    # usable between the smallest option at 10 tiles (the next idefics3 cap: a 3x3 split + global) and at 17
    probe = _device_file(tmp_path, 12 << 30)
    at_17, at_10 = _smallest_total("smolvlm-256m", probe), _smallest_total("smolvlm-256m", probe, max_tiles=10)
    assert at_10 < at_17
    devices = _device_file(tmp_path, (at_10 + at_17) / 2)
    rec = _recommend(capsys, "smolvlm-256m", devices)["recommendation"]
    assert rec["status"] == "lowered" and rec["verdict"] == "fits" and rec["total_bytes"] <= rec["usable_bytes"]
    [change] = rec["changes"]
    assert change.startswith("the tile cap 17 -> 10 (--max-tiles 10; the processor's size.longest_edge 1536)")
    assert rec["settings"] == {**rec["asked"], "tiles": 10, "tile_cap": 10, "image_positions": 10 * 64 + 9 * 2 + 3 + 4}
    # the option it names is the one a plan at the new settings recommends
    lowered = _recommend(capsys, "smolvlm-256m", devices, "--max-tiles", "10")
    assert lowered["recommended"] == f"{rec['encoder']} + {rec['decoder']}"
    assert lowered["recommendation"]["status"] == "fits" and lowered["images"]["n_tiles"] == 10


def test_recommendation_halves_the_context_when_the_image_cannot_shrink(tmp_path, capsys):
    # LLaVA-1.5 has one fixed tile: the context is the first thing to lower
    probe = _device_file(tmp_path, 24 << 30, memory_gib=24)
    at_4096, at_2048 = (_smallest_total("llava-1.5-7b", probe, context=c) for c in (4096, 2048))
    rec = _recommend(capsys, "llava-1.5-7b", _device_file(tmp_path, (at_2048 + at_4096) / 2))["recommendation"]
    assert rec["status"] == "lowered"
    assert rec["changes"] == ["the context 4,096 -> 2,048 (--context 2048; run/serve --n-ctx 2048)"]
    assert (rec["asked"]["context"], rec["settings"]["context"], rec["settings"]["tiles"]) == (4096, 2048, 1)
    assert rec["total_bytes"] <= rec["usable_bytes"] < at_4096


def test_recommendation_says_when_nothing_fits(tmp_path, capsys):
    result = _recommend(capsys, "smolvlm-256m", _device_file(tmp_path, 0.1 * (1 << 30), memory_gib=1))
    rec = result["recommendation"]
    assert result["recommended"] is None and rec["status"] == "nothing fits" and rec["verdict"] == "does not fit"
    # tried down to both floors: one tile and the 1,024-position context
    assert (rec["settings"]["tiles"], rec["settings"]["context"]) == (1, 1024)
    assert rec["line"].startswith("nothing fits, as asked (context 4,096, 17 tile(s)) or lowered to context 1,024, "
                                  "1 tile(s): the smallest option (onnx:int8 + gguf:q4_0) needs ")
    assert cli_main(["plan", "--preset", "qwen2-vl-2b", "--device", "rtx-4060-8gb", "--max-tiles", "4"]) == 2
    assert "has no tiles: pass a smaller --image-size instead" in capsys.readouterr().err


def test_recommendation_lowers_a_native_resolution_image_by_area(tmp_path, capsys):
    from edgevlm.plan.advise import NATIVE_MIN_TOKENS
    from edgevlm.plan.bundle import PlanRequest, plan_model
    from edgevlm.plan.model import from_preset

    probe = _device_file(tmp_path, 24 << 30, memory_gib=24)
    shapes, device = from_preset("qwen2-vl-2b"), get_device("fake-gpu", probe)
    big, half = (min(o["memory"]["total"] for o in plan_model(shapes, device, PlanRequest(image_size=size))["options"])
                 for size in ((1344, 1008), (950, 713)))
    rec = _recommend(capsys, "qwen2-vl-2b", _device_file(tmp_path, (big + half) / 2), "--image-size",
                     "1344x1008")["recommendation"]
    assert rec["status"] == "lowered" and rec["settings"]["image_size"] == [950, 713]
    assert rec["changes"][0].startswith("the image 1344x1008 -> 950x713 (1728 -> 850 image tokens; --image-size 950x713")
    assert rec["settings"]["tiles"] >= NATIVE_MIN_TOKENS


# --- export --for: the lowering advice --------------------------------------------------------------------------------


def test_export_for_lowers_the_tile_cap_when_nothing_fits_as_asked(ckpts, tmp_path, capsys):
    from edgevlm.manifest import Manifest
    from edgevlm.plan.bundle import PlanRequest, plan_model
    from edgevlm.plan.model import from_checkpoint

    ckpt = str(ckpts["idefics3"])
    shapes, probe = from_checkpoint(ckpt), get_device("fake-gpu", _device_file(tmp_path, 12 << 30))
    at_5, at_1 = (min(o["memory"]["total"] for o in plan_model(shapes, probe, PlanRequest(max_tiles=cap))["options"])
                  for cap in (None, 1))
    assert at_1 < at_5
    devices = _device_file(tmp_path, (at_1 + at_5) / 2)
    out = tmp_path / "bundle"
    assert cli_main(["export", ckpt, "-o", str(out), "--for", "fake-gpu", "--device-file", devices]) == 0
    [line] = [l for l in capsys.readouterr().out.splitlines() if l.startswith("nothing fits")]
    assert line.startswith("nothing fits fake-gpu at 5 tile(s) and 512 positions; with --max-tiles 1: ")
    assert "with --max-tiles 1; at run time use images of at most 1 tile(s) (the processor's size.longest_edge 32" in line
    manifest = Manifest.load(out)
    assert manifest.encoder.max_tiles == 1  # exported with the lowered cap
    chosen = re.search(r"exporting (gguf:\w+) \+ (onnx:\w+)", line).groups()
    assert {a.name for a in manifest.artifacts} - {"tokenizer"} == set(chosen)


def test_export_for_says_the_context_to_run_with(tmp_path, monkeypatch):
    """A one-tile model (LLaVA-1.5) cannot lower its image: the context is halved, and since export has no context
    setting the line says what run/serve need (--n-ctx); nothing changes in what is exported but the pair."""
    from edgevlm.plan.for_device import plan_for_device
    from edgevlm.plan import model
    from edgevlm.plan.bundle import PlanRequest, plan_model

    shapes = model.from_preset("llava-1.5-7b")
    monkeypatch.setattr(model, "from_checkpoint", lambda path: shapes)
    probe = get_device("fake-gpu", _device_file(tmp_path, 24 << 30, memory_gib=24))
    at_4096, at_2048 = (min(o["memory"]["total"] for o in plan_model(shapes, probe, PlanRequest(context=c))["options"])
                        for c in (4096, 2048))
    chosen = plan_for_device("ckpt", "fake-gpu", _device_file(tmp_path, (at_2048 + at_4096) / 2, 24), None, None)
    assert chosen["line"].startswith("nothing fits fake-gpu at 1 tile(s) and 4,096 positions; with --n-ctx 2048: ")
    assert "at run time use run/serve --n-ctx 2048 (export has no context setting)" in chosen["line"]
    assert chosen["max_tiles"] is None and chosen["recommendation"]["settings"]["context"] == 2048
    assert (chosen["encoder"], chosen["decoder"]) == (chosen["recommendation"]["encoder"],
                                                      chosen["recommendation"]["decoder"])


def test_export_for_says_the_image_size_of_a_native_resolution_model(tmp_path, monkeypatch):
    """Qwen2-VL: the largest image max_pixels keeps (3584x3584, 16,384 tokens) is more than the default context, so
    --for asks at that area halved until it fits (1267x1267), then lowers the image further; export has no
    image-size setting, so the line says what to send at run time (or which max_pixels to set)."""
    from edgevlm.plan.for_device import plan_for_device
    from edgevlm.plan import model
    from edgevlm.plan.bundle import PlanRequest, plan_model

    shapes = model.from_preset("qwen2-vl-2b")
    monkeypatch.setattr(model, "from_checkpoint", lambda path: shapes)
    probe = get_device("fake-gpu", _device_file(tmp_path, 64 << 30, memory_gib=64))
    asked, lowered = (min(o["memory"]["total"] for o in plan_model(shapes, probe, PlanRequest(image_size=s))["options"])
                      for s in ((1267, 1267), (896, 896)))
    chosen = plan_for_device("ckpt", "fake-gpu", _device_file(tmp_path, (asked + lowered) / 2, 64), None, "gguf:q4_0")
    line = chosen["line"]
    assert line.startswith("the largest image (3584x3584, 16,384 image tokens) takes more than the default context; "
                           "planned at 1267x1267: nothing fits fake-gpu at a 1267x1267 image (2,025 image tokens) and "
                           "4,096 positions; with images of 896x896 (1,024 image tokens): ")
    assert "at run time use images of at most 896x896 pixels (resize them, or set max_pixels 802816" in line
    assert line.endswith(f"exporting --decoder gguf:q4_0 as given (the plan chose {chosen['recommendation']['decoder']})")
    assert chosen["decoder"] == "gguf:q4_0" and chosen["max_tiles"] is None
    # nothing fits even at a 224x224 image and 1,024 positions: refused, one line
    with pytest.raises(BadInputError, match=r"nothing fits fake-gpu at .* nor lowered to a 224x224 image \(64 image "
                                            r"tokens\) and 1,024 positions: the smallest option"):
        plan_for_device("ckpt", "fake-gpu", _device_file(tmp_path, 0.1 * (1 << 30), memory_gib=1), None, None)
