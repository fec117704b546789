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
