"""edgevlm plan: the budget arithmetic against hand-computed values, the device table, and the command on a tiny
hand-written bundle (a synthetic GGUF and a stand-in ONNX file; no model is built)."""
from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest

from edgevlm.cli import main as cli_main
from edgevlm.errors import BadInputError
from edgevlm.layout import ImageLayout
from edgevlm.plan import budget
from edgevlm.plan.bundle import resolve_context
from edgevlm.plan.devices import THIS_MACHINE, Device, get_device, load_devices, this_machine
from edgevlm.preprocess import PreprocessSpec, tile_grid

MIB = 1 << 20

# --- KV cache ---------------------------------------------------------------------------------------------------


def test_kv_cache_bytes_gqa_f16_q8_0_f32():
    # SmolVLM-256M's decoder: 30 layers, 3 KV heads of 64
    assert budget.kv_cache_bytes(30, 3, 64, 4096) == 2 * 30 * 4096 * 3 * 64 * 2 == 94_371_840  # llama.cpp: 90.00 MiB
    assert budget.kv_cache_bytes(30, 3, 64, 4096, "q8_0") == 2 * 30 * 4096 * (3 * 64 // 32) * 34 == 50_135_040
    assert budget.kv_cache_bytes(30, 3, 64, 4096, "f32") == 188_743_680
    assert budget.kv_cache_bytes(30, 3, 64, 4096, "f16", n_seq=3) == 3 * 94_371_840


def test_kv_cache_bytes_refuses_bad_input():
    with pytest.raises(ValueError, match="kv_type"):
        budget.kv_cache_bytes(30, 3, 64, 4096, "q4_k")
    with pytest.raises(ValueError, match="multiple of 32"):
        budget.kv_cache_bytes(2, 1, 48, 64, "q8_0")  # a 48-wide row is not whole Q8_0 blocks
    with pytest.raises(ValueError, match="positive"):
        budget.kv_cache_bytes(30, 3, 64, 0)


def test_llama_cpp_pads_the_context_to_256():
    assert budget.llama_cpp_n_ctx(4096) == 4096
    assert budget.llama_cpp_n_ctx(1000) == 1024
    assert budget.llama_cpp_n_ctx(1128, n_seq=3) == 3584  # 3,384 positions, padded


# --- image positions ----------------------------------------------------------------------------------------------

SMOLVLM_LAYOUT = ImageLayout("idefics3", "<image>", "<image>", 49190, 64, fake_token="<fake_token_around_image>",
                             global_token="<global-img>", row_col_format="<row_{row}_col_{col}>")
SMOLVLM_SPLIT = PreprocessSpec("idefics3", (512, 512), longest_edge=2048, image_splitting=True)


@pytest.mark.parametrize("width, height, rows, cols, positions", [
    (512, 512, 4, 4, 17 * 64 + 16 * 2 + 4 + 4),  # upscaled to 2048: 16 tiles + global = 1,088 rows + 40 markers
    (1024, 768, 3, 4, 13 * 64 + 12 * 2 + 3 + 4),  # 2048x1536: 863
    (3000, 1000, 2, 4, 9 * 64 + 8 * 2 + 2 + 4),  # 2048x683 -> 2048x1024: 598
    (100, 4000, 4, 1, 5 * 64 + 4 * 2 + 4 + 4),  # 51x2048 -> 512x2048: 336
])
def test_image_tokens_smolvlm_splitting(width, height, rows, cols, positions):
    tokens = budget.image_tokens(SMOLVLM_LAYOUT, SMOLVLM_SPLIT, width, height)
    assert (tokens.rows, tokens.cols) == tile_grid(height, width, SMOLVLM_SPLIT) == (rows, cols)
    assert tokens.n_tiles == SMOLVLM_LAYOUT.n_tiles(rows, cols) == rows * cols + 1
    assert tokens.image_rows == tokens.n_tiles * 64
    assert tokens.positions == positions
    assert not tokens.exact
    assert budget.image_tokens(SMOLVLM_LAYOUT, SMOLVLM_SPLIT, 512, 512).positions == 1128


def test_image_tokens_one_tile():
    one_tile = PreprocessSpec("idefics3", (512, 512), longest_edge=512, image_splitting=True)
    tokens = budget.image_tokens(SMOLVLM_LAYOUT, one_tile, 512, 512)
    assert (tokens.rows, tokens.cols, tokens.n_tiles) == (0, 0, 1) == (*tile_grid(512, 512, one_tile), 1)
    assert (tokens.image_rows, tokens.text_tokens, tokens.positions) == (64, 3, 67)  # <fake><global-img>64<fake>
    unsplit = PreprocessSpec("idefics3", (512, 512), longest_edge=2048, image_splitting=False)
    assert budget.image_tokens(SMOLVLM_LAYOUT, unsplit, 1024, 768).positions == 67


def test_image_tokens_counted_by_a_tokenizer_match_the_assumed_count():
    # a stand-in tokenizer: every marker, image token and newline is one token (as SmolVLM's is)
    pieces = re.compile(r"<row_\d+_col_\d+>|<fake_token_around_image>|<global-img>|<image>|\n")
    tokens = budget.image_tokens(SMOLVLM_LAYOUT, SMOLVLM_SPLIT, 512, 512, lambda text: len(pieces.findall(text)))
    assert tokens.exact
    assert (tokens.image_rows, tokens.text_tokens, tokens.positions) == (1088, 40, 1128)


def test_image_tokens_llava_repeat_and_wrapped():
    clip = PreprocessSpec("shortest_edge_crop", (336, 336), shortest_edge=336)
    llava = ImageLayout("repeat", "<image>", "<image>", 32000, 576)
    assert budget.image_tokens(llava, clip, 1920, 1080).positions == 576
    wrapped = ImageLayout("wrapped", "<image>", "<IMG_CONTEXT>", 7, 256, start_token="<img>", end_token="</img>")
    fixed = PreprocessSpec("fixed", (448, 448))
    assert budget.image_tokens(wrapped, fixed, 800, 600).positions == 256 + 2
    assert budget.largest_image(SMOLVLM_SPLIT) == (2048, 2048)
    assert budget.largest_image(clip) == (336, 336)


# --- GGUF weights -------------------------------------------------------------------------------------------------

TINY = [("token_embd.weight", (64, 256)), ("blk.0.attn_norm.weight", (256,)), ("blk.0.attn_q.weight", (256, 256)),
        ("output_norm.weight", (256,)), ("output.weight", (64, 256))]


def test_gguf_weight_bytes_q8_0_and_f16():
    q8 = budget.gguf_weight_bytes(TINY, "q8_0")
    assert q8 == {"token_embd.weight": 64 * 8 * 34, "blk.0.attn_norm.weight": 256 * 4, "blk.0.attn_q.weight": 256 * 8 * 34,
                  "output_norm.weight": 256 * 4, "output.weight": 64 * 8 * 34}
    assert sum(q8.values()) == 17408 + 1024 + 69632 + 1024 + 17408
    f16 = budget.gguf_weight_bytes(TINY, "f16")
    assert f16 == {"token_embd.weight": 64 * 256 * 2, "blk.0.attn_norm.weight": 1024, "blk.0.attn_q.weight": 131072,
                   "output_norm.weight": 1024, "output.weight": 32768}


def test_gguf_weight_bytes_q4_k_m_mixture():
    types = budget.gguf_tensor_types(TINY, "q4_k_m")
    assert types == {"token_embd.weight": "Q4_K", "blk.0.attn_norm.weight": "F32", "blk.0.attn_q.weight": "Q4_K",
                     "output_norm.weight": "F32", "output.weight": "Q6_K"}
    assert budget.gguf_weight_bytes(TINY, "q4_k_m")["output.weight"] == 64 * 210  # one 256-block of Q6_K per row
    assert budget.gguf_weight_bytes(TINY, "q4_0")["output.weight"] == 64 * 210  # Q4_0 files keep the output at Q6_K


def test_gguf_k_quant_fallbacks_match_smolvlm_256m():
    # the exact bytes of SmolVLM-256M's q4_k_m GGUF (hidden 576, not a multiple of 256; FFN 1536 = 6 x 256)
    shapes = budget.llama_decoder_tensors(576, 30, 9, 3, 64, 1536, 49280, tied=True)
    types = budget.gguf_tensor_types(shapes, "q4_k_m")
    sizes = budget.gguf_weight_bytes(shapes, "q4_k_m")
    assert types["token_embd.weight"] == "Q8_0" and "output.weight" not in types  # tied: the output rule, 576 -> Q8_0
    assert (types["blk.0.attn_q.weight"], sizes["blk.0.attn_q.weight"]) == ("Q5_0", 576 * 18 * 22)  # Q4_K -> Q5_0
    assert (types["blk.0.attn_v.weight"], sizes["blk.0.attn_v.weight"]) == ("Q8_0", 192 * 18 * 34)  # Q6_K -> Q8_0
    assert (types["blk.0.ffn_down.weight"], sizes["blk.0.ffn_down.weight"]) == ("Q6_K", 576 * 6 * 210)
    assert (types["blk.3.ffn_down.weight"], sizes["blk.3.ffn_down.weight"]) == ("Q4_K", 576 * 6 * 144)  # 1536 rows fit
    more_bits = [i for i in range(30) if types[f"blk.{i}.ffn_down.weight"] == "Q6_K"]
    assert more_bits == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert sum(sizes.values()) == 103_746_816  # the tensor bytes of the real file (benchmarks' w1 bundle)


def test_read_gguf_tensors_gives_the_exact_stored_bytes(tmp_path):
    import gguf

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.ones((8, 64), dtype=np.float16))
    writer.add_tensor("token_embd.weight", np.zeros((4, 2 * 34), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensors = {t.name: t for t in budget.read_gguf_tensors(path)}
    assert {n: (t.shape, t.type_name, t.n_bytes) for n, t in tensors.items()} == {
        "output_norm.weight": ((64,), "F32", 256), "blk.0.attn_q.weight": ((8, 64), "F16", 1024),
        "token_embd.weight": ((4, 64), "Q8_0", 4 * 2 * 34)}
    assert all(budget.tensor_bytes(t.type_name, t.shape) == t.n_bytes for t in tensors.values())


# --- compute buffer, decode speed, the plan ------------------------------------------------------------------------


def test_llama_cpp_compute_buffer_formula():
    # SmolVLM-256M: V 49,280, d 576, 9 heads, ubatch 512; llama.cpp measured 99.63 / 166.38 / 98.50 MiB here
    logits = 4 * 512 * (576 + 49280) + 4 * 49280
    assert budget.llama_cpp_compute_buffer_bytes(49280, 576, 9, 4096) == logits == 102_302_208
    assert budget.llama_cpp_compute_buffer_bytes(49280, 576, 9, 8192) == 4 * 512 * (1 + 4 * 576 + 8192 * 10) + 4 * 49280
    assert budget.llama_cpp_compute_buffer_bytes(49280, 576, 9, 8192, flash_attn=True) == logits
    assert budget.llama_cpp_compute_buffer_bytes(49280, 576, 9, 8192, n_ubatch=256) == 1024 * 84225 + 4 * 49280


def test_decode_tokens_per_second_is_the_roofline_times_efficiency():
    assert budget.decode_tokens_per_second(1_000_000_000, 0, 100.0, 0.5) == pytest.approx(50.0)
    assert budget.decode_tokens_per_second(900_000_000, 100_000_000, 68.0, 0.55) == pytest.approx(68 * 0.55)
    with pytest.raises(ValueError, match="efficiency"):
        budget.decode_tokens_per_second(1, 0, 1.0, 1.5)


def test_memory_plan_total_and_verdict():
    plan = budget.MemoryPlan(decoder_weights=40, encoder_weights=10, encoder_activations=5, kv_cache=20,
                             compute_buffer=10, caches=5, runtime_overhead=10, margin=10)
    assert (plan.needed, plan.total) == (100, 110)
    assert [plan.verdict(u) for u in (110, 200, 109, 100, 99)] == ["fits", "fits", "tight", "tight", "does not fit"]
    assert plan.to_dict()["total"] == 110
    with pytest.raises(ValueError, match="kv_cache"):
        budget.MemoryPlan(1, 1, 1, -1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="decoder_weights"):
        budget.MemoryPlan(1.5, 1, 1, 1, 1, 1, 1, 1)
    assert budget.default_margin_bytes(8 << 30) == 512 * MIB and budget.default_margin_bytes(16 << 30) == 1024 * MIB


# --- devices --------------------------------------------------------------------------------------------------------

REQUIRED = ("jetson-orin-nano-4gb", "jetson-orin-nano-8gb", "jetson-orin-nano-super-8gb", "jetson-orin-nx-8gb",
            "jetson-orin-nx-16gb", "jetson-agx-orin-32gb", "jetson-agx-orin-64gb", "jetson-thor", "apple-m1-8gb",
            "apple-m2-8gb", "apple-m2-pro-16gb", "apple-m3-8gb", "apple-m3-pro-18gb", "apple-m4-16gb",
            "apple-m4-pro-24gb", "rtx-3060-12gb", "rtx-4060-8gb", "rtx-4090-24gb", "raspberry-pi-5-8gb")


def test_device_table_loads_and_every_entry_validates():
    table = load_devices()
    assert set(REQUIRED) <= set(table) and len(table) == 26
    for device in table.values():  # each was built through Device.__post_init__; check what it guarantees
        assert 0 < device.usable_bytes <= device.memory_bytes and device.bandwidth_gbs > 0 and device.sources
        assert Device.from_dict(device.to_dict()) == device
    nano = table["jetson-orin-nano-8gb"]
    assert (nano.memory_bytes, nano.usable_bytes, nano.bandwidth_gbs, nano.target) == (8 << 30, int(5.2 * (1 << 30)), 68,
                                                                                      "jetson-orin")


def test_unknown_device_lists_the_known_ones():
    with pytest.raises(BadInputError) as info:
        get_device("orin-nano")
    message = str(info.value)
    assert "'orin-nano'" in message and THIS_MACHINE in message
    assert all(device_id in message for device_id in REQUIRED)


def test_device_file_adds_and_replaces_devices(tmp_path):
    mine = {"id": "my-board", "name": "my board", "kind": "sbc", "memory_gib": 4, "usable_gib": 3,
            "usable_basis": "measured with free -m", "bandwidth_gbs": 12.5, "target": "cpu", "sources": ["me"]}
    nano = {**mine, "id": "jetson-orin-nano-8gb", "name": "my headless nano", "kind": "jetson", "memory_gib": 8,
            "usable_gib": 6, "bandwidth_gbs": 68, "target": "jetson-orin"}
    path = tmp_path / "devices.json"
    path.write_text(json.dumps({"version": 1, "devices": [mine, nano]}))
    assert get_device("my-board", path).bandwidth_gbs == 12.5
    assert get_device("jetson-orin-nano-8gb", path).usable_gib == 6
    path.write_text(json.dumps({"version": 1, "devices": [{**mine, "usable_gib": 5}]}))
    with pytest.raises(BadInputError, match="--device-file.*usable_gib 5 is more than memory_gib 4"):
        get_device("my-board", path)
    path.write_text(json.dumps({"version": 1, "devices": [{**mine, "target": "tpu"}]}))
    with pytest.raises(BadInputError, match="target 'tpu'"):
        load_devices(path)


def test_this_machine_is_measured():
    device = this_machine(bandwidth_gbs=12.0)  # a given bandwidth: the test does not time a copy
    assert device.id == THIS_MACHINE and device.bandwidth_measured and device.bandwidth_gbs == 12.0
    assert 0 < device.usable_bytes <= device.memory_bytes


# --- the command on a hand-written bundle -------------------------------------------------------------------------

DECODER = {"architecture": "llama", "hidden_size": 64, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "head_dim": 32,
           "intermediate_size": 128, "vocab_size": 128, "context_length": 1024, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": True, "position_scheme": "1d",
           "image_attention": "causal"}


def _file_entry(bundle, relative):
    data = (bundle / relative).read_bytes()
    return {"path": relative, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _tiny_bundle(tmp_path):
    """A bundle manifest with a synthetic F32 GGUF decoder and a stand-in ONNX file (the planner reads its size only)."""
    import gguf

    bundle = tmp_path / "bundle"
    (bundle / "decoder").mkdir(parents=True)
    (bundle / "encoder").mkdir()
    writer = gguf.GGUFWriter(str(bundle / "decoder" / "f32.gguf"), "llama")
    for name, shape in budget.llama_decoder_tensors(64, 2, 2, 1, 32, 128, 128, tied=True):
        writer.add_tensor(name, np.zeros(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (bundle / "encoder" / "int8.onnx").write_bytes(b"\0" * 1000)
    layout = {"kind": "repeat", "placeholder": "<image>", "image_token": "<image>", "image_token_id": 5,
              "tokens_per_tile": 16}
    manifest = {
        "family": "llava", "source": {"path": "nowhere", "sha256": "0" * 64, "architecture": "LlavaForConditionalGeneration"},
        "preprocess": PreprocessSpec("fixed", (64, 64)).to_dict(), "image_layout": layout,
        "encoder": {"input_name": "pixel_values", "output_name": "image_embeds", "input_shape": ["tiles", 3, 64, 64],
                    "output_shape": ["tiles", 16, 64], "max_tiles": 1, "dtype": "float32"},
        "decoder": DECODER,
        "tokenizer": {"path": "tokenizer", "chat_template": None, "stop_token_ids": [2], "bos_token_id": 1,
                      "eos_token_id": 2},
        "artifacts": [
            {"name": "gguf:f32", "role": "decoder", "format": "gguf", "precision": "f32", "path": "decoder/f32.gguf",
             "files": [_file_entry(bundle, "decoder/f32.gguf")], "details": {}},
            {"name": "onnx:int8", "role": "encoder", "format": "onnx", "precision": "int8", "path": "encoder/int8.onnx",
             "files": [_file_entry(bundle, "encoder/int8.onnx")], "details": {}},
        ],
        "format": "edgevlm-bundle", "format_version": 1, "edgevlm_version": "0.1.0",
    }
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle


def test_plan_command_itemises_a_bundle(tmp_path, capsys):
    bundle = _tiny_bundle(tmp_path)
    assert cli_main(["plan", str(bundle), "--device", "raspberry-pi-5-8gb", "--context", "300", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["context"], result["n_ctx"], result["images"]["positions"]) == (300, 512, 16)
    [option] = result["options"]
    memory = option["memory"]
    weights = sum(n * 4 for n in [128 * 64] + 2 * [64, 64 * 64, 32 * 64, 32 * 64, 64 * 64, 64, 128 * 64 * 3] + [64])
    assert memory["decoder_weights"] == weights  # F32: 4 bytes an element, header excluded
    assert memory["encoder_weights"] == 1000
    assert memory["kv_cache"] == 2 * 2 * 512 * 32 * 2  # padded to 512 positions, f16
    assert memory["compute_buffer"] == 4 * 512 * (1 + 4 * 64 + 512 * (1 + 2)) + 4 * 128  # KQ scores, no flash attn
    # one tile + its f32 embeddings + its preprocessed f32 pixels (added 2026-12-01: budget.image_input_bytes)
    assert memory["encoder_activations"] == 788 * 64 * 64 + 16 * 64 * 4 + 3 * 64 * 64 * 4
    assert memory["caches"] == (256 + 512) * MIB and memory["margin"] == 512 * MIB
    assert option["verdict"] == "fits" and result["recommended"] == "onnx:int8 + gguf:f32"
    ceiling = 17.1e9 / (option["weight_bytes_per_token"] + 2 * 2 * 16 * 32 * 2)  # KV of the 16 image positions
    assert option["decode_tok_s"] == pytest.approx(0.55 * ceiling)


def test_plan_command_refuses_a_context_past_the_model(tmp_path, capsys):
    bundle = _tiny_bundle(tmp_path)
    assert cli_main(["plan", str(bundle), "--device", "rtx-4090-24gb", "--context", "4096"]) == 2
    assert "--context 4096 is more than this model supports (1024 positions)" in capsys.readouterr().err
    with pytest.raises(BadInputError, match="1024"):
        resolve_context(1025, 1024, 4096)
    assert resolve_context(None, 1024, 4096) == 1024 and resolve_context(None, 8192, 4096) == 4096
    assert cli_main(["plan", str(bundle), "--device", "nope"]) == 2
    assert "known devices: apple-m1-16gb" in capsys.readouterr().err


def test_plan_png_draws_stacked_bars_and_refuses_a_bad_path(tmp_path, capsys):
    from PIL import Image

    bundle = _tiny_bundle(tmp_path)
    out = tmp_path / "plan.png"
    assert cli_main(["plan", str(bundle), "--device", "jetson-orin-nano-8gb", "--png", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["options"][0]["verdict"] == "fits"
    image = np.asarray(Image.open(out).convert("L"))
    assert image.shape[0] >= 400 and image.shape[1] >= 600
    assert (image < 128).mean() > 0.01  # bars, labels and the usable line were drawn
    assert cli_main(["plan", str(bundle), "--device", "jetson-orin-nano-8gb", "--png", str(tmp_path / "no" / "x.png")]) == 2
    assert "--png wants a .png file in an existing folder" in capsys.readouterr().err


def test_run_warns_at_start_when_the_bundle_will_not_fit_this_machine(bundles, tmp_path, capsys):
    """The planner's verdict for the pair that runs, against the memory available before loading: a prefix-cache
    bound larger than this machine's memory is a warning line (the run itself goes on); the defaults fit silently."""
    import psutil
    from PIL import Image

    image = tmp_path / "red.png"
    Image.new("RGB", (64, 64), "red").save(image)
    bundle = str(bundles["llava-clip"])
    base = ["run", bundle, "--image", str(image), "--prompt", "What is it?", "--max-tokens", "2", "--encoder",
            "onnx:int8", "--decoder", "gguf:q8_0"]
    assert cli_main(base) == 0
    assert "warning:" not in capsys.readouterr().err
    too_big = int(psutil.virtual_memory().total / MIB * 2)
    assert cli_main(base + ["--prefix-cache-mb", str(too_big)]) == 0
    err = capsys.readouterr().err
    assert "warning: onnx:int8 + gguf:q8_0 at context" in err and "MiB is available here" in err
    assert f"edgevlm plan {bundle} --device this-machine" in err


# --- one request, measured encoder terms, the probes ----------------------------------------------------------------


def test_llama_cpp_compute_in_use_is_one_requests_ubatch_and_kv_span():
    # SmolVLM-256M (V 49,280, d 576, 9 heads): W1-split's request (1,215 positions) fills a 512 ubatch over 1,280
    # KV cells; W1's (88 positions) one ubatch of 88 over 256; plus one row of logits' output buffer (4 V)
    assert budget.llama_cpp_compute_in_use_bytes(49280, 576, 9, 1215) == 4 * 512 * (1 + 4 * 576 + 1280 * 10) \
        + 4 * 49280 == 31_132_160
    assert budget.llama_cpp_compute_in_use_bytes(49280, 576, 9, 88) == 4 * 88 * (1 + 4 * 576 + 256 * 10) \
        + 4 * 49280 == 1_909_600
    assert budget.llama_cpp_compute_in_use_bytes(49280, 576, 9, 88, flash_attn=True) == \
        4 * 88 * (1 + 4 * 576) + 2 * 88 * 256 + 4 * 49280
    # a tiny model: one row of logits is larger than the attention scratch
    assert budget.llama_cpp_compute_in_use_bytes(1000, 8, 1, 1) == 4 * (8 + 1000) + 4 * 1000
    # never more than the reservation at the same n_ctx
    assert budget.llama_cpp_compute_in_use_bytes(49280, 576, 9, 4096) <= budget.llama_cpp_compute_buffer_bytes(
        49280, 576, 9, 4096)
    with pytest.raises(ValueError, match="positions"):
        budget.llama_cpp_compute_in_use_bytes(49280, 576, 9, 0)


def test_cpu_runtime_overhead_is_the_measured_baseline_session_and_vocabulary():
    assert budget.RUNTIME_BASELINE_BYTES == 68 * MIB and budget.RUNTIME_CPU_SESSION_BYTES == 12 * MIB
    assert budget.runtime_overhead_bytes("cpu", 49280) == 80 * MIB + 512 * 49280 == 109_117_440  # SmolVLM-256M
    assert budget.runtime_overhead_bytes("cpu", 419) == 80 * MIB + 512 * 419  # the reference model
    assert budget.runtime_overhead_bytes("cuda", 49280) == 512 * MIB  # GPU targets: the per-target estimate
    with pytest.raises(ValueError, match="target"):
        budget.runtime_overhead_bytes("tpu", 10)


def test_decode_efficiency_by_weight_width_and_bandwidth_kind():
    assert budget.decode_efficiency("q8_0", True) == budget.decode_efficiency("f16", True) == 0.55
    assert budget.decode_efficiency("q4_k_m", True) == budget.decode_efficiency("q4_0", True) == 0.38
    assert budget.decode_efficiency("q4_k_m", False) == budget.decode_efficiency("q8_0", False) == 0.55


def test_image_input_bytes_hold_the_tiles_twice_when_stacked():
    assert budget.image_input_bytes(17, 3, 512, 512) == 2 * 17 * 3 * 512 * 512 * 4 == 106_954_752  # W1-split
    assert budget.image_input_bytes(1, 3, 512, 512) == 3 * 512 * 512 * 4  # one tile is not stacked
    with pytest.raises(ValueError, match="positive"):
        budget.image_input_bytes(0, 3, 512, 512)


def test_plan_one_request_is_the_bench_figure(tmp_path, capsys):
    """The one-request figure: the caches at what one request stores (the image prefix's KV snapshot), the part of
    the compute buffer its graphs write, no margin; every other item as in the fit figure."""
    bundle = _tiny_bundle(tmp_path)
    assert cli_main(["plan", str(bundle), "--device", "raspberry-pi-5-8gb", "--context", "300", "--prompt-tokens",
                     "20", "--new-tokens", "30", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["one_request"] == {"prompt_tokens": 20, "new_tokens": 30, "positions": 16 + 20 + 30}
    [option] = result["options"]
    memory, one = option["memory"], option["memory_one_request"]
    for item in ("decoder_weights", "encoder_weights", "encoder_activations", "kv_cache", "runtime_overhead"):
        assert one[item] == memory[item]
    assert one["caches"] == 2 * 2 * 16 * 32 * 2  # K and V of the 16 image positions, 2 layers, 1 KV head of 32, f16
    assert one["compute_buffer"] == 4 * 66 * (1 + 4 * 64 + 256 * (1 + 2)) + 4 * 128  # 66 positions, 256 KV cells
    assert one["margin"] == 0 and option["peak_one_request"] == one["needed"] == one["total"]
    assert memory["runtime_overhead"] == budget.RUNTIME_OVERHEAD_BYTES["cpu"] + 512 * 128  # vocabulary of 128
    # the defaults are the bench's: 24 prompt tokens, 64 new
    assert cli_main(["plan", str(bundle), "--device", "raspberry-pi-5-8gb", "--context", "300", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["one_request"]["positions"] == 16 + 24 + 64
    # no images: nothing in the caches
    assert cli_main(["plan", str(bundle), "--device", "raspberry-pi-5-8gb", "--images", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["options"][0]["memory_one_request"]["caches"] == 0
    with pytest.raises(BadInputError, match="--prompt-tokens"):
        from edgevlm.plan.bundle import PlanRequest

        PlanRequest(prompt_tokens=-1)


def test_plan_prefers_the_encoder_figures_measured_at_export(tmp_path, capsys):
    """details.activation_bytes_per_tile and details.session_resident_bytes replace the per-pixel constant and the
    file size on a CPU target; a GPU target keeps the file size (the resident figure is ORT CPU's)."""
    bundle = _tiny_bundle(tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["artifacts"][1]["details"] = {"activation_bytes_per_tile": 123_456, "session_resident_bytes": 7_000}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert cli_main(["plan", str(bundle), "--device", "raspberry-pi-5-8gb", "--context", "300", "--json"]) == 0
    memory = json.loads(capsys.readouterr().out)["options"][0]["memory"]
    pixels = 3 * 64 * 64 * 4
    assert memory["encoder_activations"] == 123_456 + 16 * 64 * 4 + pixels and memory["encoder_weights"] == 7_000
    assert cli_main(["plan", str(bundle), "--device", "jetson-orin-nano-8gb", "--json"]) == 0
    memory = json.loads(capsys.readouterr().out)["options"][0]["memory"]
    assert memory["encoder_weights"] == 1000 and memory["encoder_activations"] == 123_456 + 16 * 64 * 4 + pixels


def _wide_graph(path):
    """A stand-in encoder whose activations are measurable: (1, 3, 512, 512) f32 through three element-wise ops,
    each a fresh 3 MiB tensor in ORT's arena."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["tiles", 3, 512, 512])
    y = helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["tiles", 3, 512, 512])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    nodes = [helper.make_node("Mul", ["pixel_values", "two"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["image_embeds"])]
    graph = helper.make_graph(nodes, "wide", [x], [y], [two])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


@pytest.mark.skipif(not __import__("pathlib").Path("/proc/self/status").is_file(), reason="the probes read /proc")
def test_probes_measure_in_a_fresh_process(tmp_path):
    from edgevlm.plan import probe

    details = probe.encoder_activation_details(_wide_graph(tmp_path / "wide.onnx"), "pixel_values", (3, 512, 512), 1)
    assert details["activation_bytes_per_tile"] >= 3 * MIB  # at least the output tile
    assert details["activation_bytes_per_tile"] < 256 * MIB and details["session_resident_bytes"] >= 0
    assert "measured at export" in details["activation_basis"]
    assert probe.encoder_activation_details(tmp_path / "missing.onnx", "pixel_values", (3, 8, 8)) == {}
    runtime = probe.run_probe("runtime")
    assert 20 * MIB < runtime["runtime_baseline_bytes"] <= runtime["peak_bytes"]


def test_exported_onnx_encoders_carry_their_measured_activations(bundles):
    from edgevlm.manifest import Manifest

    manifest = Manifest.load(bundles["llava-clip"])
    for artifact in manifest.artifacts:
        if artifact.format == "onnx" and "activation_bytes_per_tile" in artifact.details:
            assert artifact.details["activation_bytes_per_tile"] > 0
            assert artifact.details["session_resident_bytes"] >= 0
    assert any("activation_bytes_per_tile" in a.details for a in manifest.artifacts if a.format == "onnx")


# --- before export: checkpoints and presets -----------------------------------------------------------------------

TINY_IDEFICS3 = dict(text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2, text_mlp=128, vision_hidden=32,
                     vision_layers=2, vision_heads=2, vision_mlp=64, patch=8, image=32, scale_factor=2, vocab=400,
                     tied=False)  # tests/builders.build_idefics3's shapes


def _gguf_bytes(path) -> int:
    return sum(t.n_bytes for t in budget.read_gguf_tensors(path))


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
    import subprocess
    import sys

    code = ("import sys, json; from edgevlm.cli import main; "
            f"assert main(['plan', {str(ckpts['idefics3'])!r}, '--device', 'rtx-4060-8gb', '--json']) == 0; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
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


def _device_file(tmp_path, usable_bytes: float, memory_gib: float = 16) -> str:
    """A one-GPU device file with `usable_bytes` usable (a discrete GPU: the caches are host memory, not counted)."""
    entry = {"id": "fake-gpu", "name": "a fake GPU", "kind": "discrete-gpu", "memory_gib": memory_gib,
             "usable_gib": usable_bytes / (1 << 30), "usable_basis": "test", "bandwidth_gbs": 100, "target": "cuda",
             "sources": ["test"], "compute": {"fp16_tflops": 10.0}}
    path = tmp_path / "devices.json"
    path.write_text(json.dumps({"version": 1, "devices": [entry]}))
    return str(path)


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
    import subprocess
    import sys

    code = ("import sys, json; from edgevlm.cli import main; "
            f"assert main(['plan', {str(qwen_ckpts['2.5'])!r}, '--device', 'rtx-4060-8gb', '--json']) == 0; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
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


def test_plan_png_title_counts_image_tokens_of_a_native_resolution_image(qwen_bundle, capsys):
    """The W3 PNG labelled one 448x448 image "256 tiles"; they are 256 image tokens of one image."""
    from edgevlm.commands.plan import png_title

    result = _plan_json(capsys, str(qwen_bundle), "--device", "jetson-orin-nano-8gb", "--image-size", "448x448")
    line1, line2 = png_title(result).split("\n")
    assert line1.endswith("on " + result["device"]["name"])
    assert line2 == f"context {result['context']}, 1 x 448x448 ({result['images']['n_tiles']} image tokens each)"
