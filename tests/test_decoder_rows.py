"""SmolVLM2 through the idefics3 family, InternVL3 (its own family, Qwen2 decoder), and the qwen2 decoder row (also
a LLaVA with a Qwen2 decoder), each with tied and untied output: HF pixels, ids and greedy tokens; ONNX, F32 GGUF
and fp32 MLX parity; stock llama.cpp's tokenizer and logits."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import edgevlm
from edgevlm.families import load_checkpoint
from edgevlm.loading import session_from_checkpoint
from edgevlm.manifest import Manifest
from edgevlm.preprocess import preprocess
from edgevlm.runtimes.llamacpp import open_decoder
from edgevlm.verify import DECODER_NMSE, nmse

NEW = ["smolvlm2", "llava-qwen2", "llava-qwen2-tied", "internvl", "internvl-tied"]
QWEN2 = ["llava-qwen2", "llava-qwen2-tied", "internvl", "internvl-tied"]
PROMPT = "Look: <image> what colour is the circle?"


@pytest.fixture(scope="module")
def new_bundles(ckpts, tmp_path_factory):
    pytest.importorskip("mlx.core", reason="MLX is not installed on this platform (pip install 'mlx[cpu]' mlx-lm)")  # CI: fails
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint

    root = tmp_path_factory.mktemp("decoder-rows")
    decoders = [ArtifactRequest("gguf", "f32"), ArtifactRequest("gguf", "q8_0"), ArtifactRequest("gguf", "q4_k_m"),
                ArtifactRequest("mlx", "fp32")]
    return {name: export_checkpoint(ckpts[name], root / name, [ArtifactRequest("onnx", "fp32")], decoders, max_tiles=8)
            for name in NEW}


def test_smolvlm2_loads_with_its_own_class_without_the_model_type_warning(ckpts, caplog):
    from transformers import SmolVLMForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            ckpt = load_checkpoint(ckpts["smolvlm2"])
    finally:
        hf_logging.disable_propagation()
    assert isinstance(ckpt.hf_model, SmolVLMForConditionalGeneration)
    assert not [r for r in caplog.records if "to instantiate a model of type" in r.getMessage()]
    assert ckpt.family == "idefics3" and ckpt.stop_token_ids == sorted({ckpt.tokenizer.convert_tokens_to_ids("<end_of_utterance>"), 2})
    assert "<video>" in ckpt.chat_template  # SmolVLM2's own template, read from the checkpoint


def _smolvlm2_hf_inputs(ckpt, path, image, text):
    """HF's pixels and ids. SmolVLMProcessor cannot be built without torchvision, so its own prompt expansion
    (processing_smolvlm.get_image_prompt_string) is applied with the image processor's rows and columns."""
    from transformers import AutoImageProcessor
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    hf_proc = AutoImageProcessor.from_pretrained(path)
    out = hf_proc(images=[image], return_tensors="np", return_row_col_info=True)
    rows, cols = out["rows"][0][0], out["cols"][0][0]
    expanded = text.replace("<image>", get_image_prompt_string(rows, cols, ckpt.layout.tokens_per_tile,
                                                               "<fake_token_around_image>", "<image>", "<global-img>"))
    ids = ckpt.tokenizer(expanded, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return out, ids


@pytest.mark.parametrize("image_name", ["small", "wide", "tall", "tiny", "square"])
def test_smolvlm2_pixels_and_ids_match_hf(image_name, ckpts, images):
    ckpt = load_checkpoint(ckpts["smolvlm2"])
    session = session_from_checkpoint(ckpt)
    image = images[image_name]
    text = session.render([session.user_message("What colour is the circle?", 1)])
    hf, hf_ids = _smolvlm2_hf_inputs(ckpt, ckpts["smolvlm2"], image, text)
    ours = preprocess(image, ckpt.preprocess)
    assert np.abs(hf["pixel_values"].reshape(ours.pixel_values.shape) - ours.pixel_values).max() <= 1e-6
    prompt = session.tokenize(text, [session._prepare_image(image)])
    assert prompt.ids.tolist() == hf_ids[0].tolist()
    if image_name == "wide":
        assert (ours.rows, ours.cols) == (1, 2)  # split into tiles + the global view


@pytest.mark.parametrize("family", NEW)
def test_greedy_tokens_equal_model_generate(family, ckpts, images):
    ckpt = load_checkpoint(ckpts[family])
    session = session_from_checkpoint(ckpt)
    image = images["wide"]
    text = session.render([session.user_message("Describe <image> the image.", 1)])
    if family == "smolvlm2":
        hf, ids = _smolvlm2_hf_inputs(ckpt, ckpts[family], image, text)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                  "pixel_values": torch.from_numpy(hf["pixel_values"]),
                  "pixel_attention_mask": torch.from_numpy(hf["pixel_attention_mask"])}
    elif family.startswith("internvl"):
        from builders import internvl_processor

        inputs = internvl_processor(ckpts[family])(images=[image], text=[text], return_tensors="pt")
    else:
        from transformers import AutoProcessor

        inputs = AutoProcessor.from_pretrained(ckpts[family])(images=[image], text=[text], return_tensors="pt")
    ckpt.hf_model.generation_config.eos_token_id = None
    with torch.inference_mode():
        out = ckpt.hf_model.generate(**inputs, max_new_tokens=16, do_sample=False)
    expected = out[0, inputs["input_ids"].shape[1]:].tolist()
    prompt = "Describe <image> the image.".replace("<image>", ckpt.layout.placeholder)
    assert session.generate(image, prompt, max_tokens=16, stop_token_ids=[]).tokens == expected


@pytest.mark.parametrize("image_name", ["small", "wide", "tall", "tiny", "square"])
def test_internvl_pixels_and_ids_match_hf_processor(image_name, ckpts, images):
    """transformers' own InternVLProcessor (crop_to_patches forced on, as it does): tiles, thumbnail, ids."""
    from builders import internvl_processor

    ckpt = load_checkpoint(ckpts["internvl"])
    session = session_from_checkpoint(ckpt)
    image = images[image_name]
    text = session.render([session.user_message("What colour is the circle?", 1)])
    hf = internvl_processor(ckpts["internvl"])(images=[image], text=[text], return_tensors="np")
    ours = preprocess(image, ckpt.preprocess)
    assert hf["pixel_values"].shape == ours.pixel_values.shape
    assert np.abs(hf["pixel_values"] - ours.pixel_values).max() <= 1e-6
    assert session.tokenize(text, [session._prepare_image(image)]).ids.tolist() == hf["input_ids"][0].tolist()


def test_internvl_vision_equals_hf_image_features(ckpts, images):
    ckpt = load_checkpoint(ckpts["internvl"])
    pixels = torch.from_numpy(preprocess(images["wide"], ckpt.preprocess).pixel_values)  # grid + thumbnail
    assert pixels.shape[0] > 1
    with torch.inference_mode():
        ours = ckpt.vision(pixels)
        hf = ckpt.hf_model.model.get_image_features(pixel_values=pixels).pooler_output
    assert ours.shape == (pixels.shape[0], ckpt.layout.tokens_per_tile, ckpt.decoder.config.hidden_size)
    assert torch.allclose(ours.reshape(hf.shape), hf, atol=1e-6)


@pytest.mark.parametrize("family", ["smolvlm2", "internvl"])
def test_onnx_fp32_encoder_matches_torch(family, ckpts, new_bundles, images):
    from edgevlm.runtimes.onnx_encoder import OnnxRuntimeEncoder

    ckpt = load_checkpoint(ckpts[family])
    pixels = preprocess(images["wide"], ckpt.preprocess).pixel_values
    with torch.inference_mode():
        ref = ckpt.vision(torch.from_numpy(pixels)).numpy()
    manifest = Manifest.load(new_bundles[family])
    ours = OnnxRuntimeEncoder(new_bundles[family], manifest.find("encoder", "onnx:fp32"), manifest.encoder,
                              threads=1).encode(pixels)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_qwen2_decoder_is_a_stock_qwen2_with_biases(ckpts):
    from transformers import Qwen2ForCausalLM

    for name in QWEN2:
        ckpt = load_checkpoint(ckpts[name])
        assert isinstance(ckpt.decoder, Qwen2ForCausalLM)
        assert ckpt.decoder.model.layers[0].self_attn.q_proj.bias.abs().max() > 0.1  # the builder made them matter
        Qwen2ForCausalLM(ckpt.decoder.config).load_state_dict(ckpt.decoder.state_dict())


@pytest.mark.parametrize("family", NEW)
@pytest.mark.parametrize("decoder", ["gguf:f32", "mlx:fp32"])
def test_f32_decoders_parity_with_pytorch(family, decoder, ckpts, new_bundles, images):
    pics = [images["small"], images["wide"]]
    placeholder = Manifest.load(new_bundles[family]).image_layout.placeholder
    prompt = "First <image> second <image> which is bigger?".replace("<image>", placeholder)
    ref = edgevlm.load(ckpts[family]).generate(pics, prompt, max_tokens=24, stop_token_ids=[], return_logits=True)
    session = edgevlm.load(new_bundles[family], encoder="onnx:fp32", decoder=decoder, threads=1)
    ours = session.generate(pics, prompt, max_tokens=24, stop_token_ids=[], return_logits=True)
    assert ours.tokens == ref.tokens
    assert nmse(np.stack(ours.logits), np.stack(ref.logits)) <= DECODER_NMSE


def test_qwen2_gguf_layout(new_bundles):
    import gguf

    for name, tied in (("llava-qwen2", False), ("llava-qwen2-tied", True), ("internvl", False), ("internvl-tied", True)):
        reader = gguf.GGUFReader(str(new_bundles[name] / "decoder" / "f32.gguf"))
        arch = reader.fields["general.architecture"]
        assert bytes(arch.parts[arch.data[0]]).decode() == "qwen2"
        pre = reader.fields["tokenizer.ggml.pre"]
        assert bytes(pre.parts[pre.data[0]]).decode() == "qwen2"
        tensors = {t.name: t for t in reader.tensors}
        assert {f"blk.0.attn_{x}.bias" for x in "qkv"} <= set(tensors)
        assert all(tensors[f"blk.1.attn_{x}.bias"].tensor_type.name == "F32" for x in "qkv")
        assert ("output.weight" in tensors) is not tied
        q8 = gguf.GGUFReader(str(new_bundles[name] / "decoder" / "q8_0.gguf"))
        assert {t.name: t.tensor_type.name for t in q8.tensors}["blk.0.attn_q.bias"] == "F32"
        artifact = Manifest.load(new_bundles[name]).find("decoder", "gguf:q4_k_m")
        assert "not multiples of 256" in artifact.details["k_quant_fallback"]  # hidden 64: legacy quants, reported


STRINGS = [
    "Hello world", "  leading and   multiple   spaces ", "tabs\tand\nnewlines\n\n\n", "Ünïcödé ñ 日本語 😀",
    "digits 0123456789 3.14159 -42", "<|im_start|>user\nWhat?<|im_end|>", "<image><image> mixed <|endoftext|>",
    "I'm sure they'll say it's DONE'S", "", "a", "x\r\ny  \n z",
]


@pytest.mark.parametrize("family", ["llava-qwen2", "smolvlm2", "internvl"])
def test_stock_llama_cpp_tokenizes_and_predicts_like_hf(family, new_bundles):
    """llama.cpp's own tokenizer (pre-tokenizer qwen2 / smollm) gives HF's ids; llama-cpp-python's `Llama` gives
    the llama.cpp decoder's logits on the same GGUF."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from edgevlm.runtimes.base import Segment

    bundle = new_bundles[family]
    hf = AutoTokenizer.from_pretrained(bundle / "tokenizer")
    path = bundle / "decoder" / "f32.gguf"
    ours = open_decoder(path, threads=1, parity=True)
    for text in STRINGS:
        assert ours.tokenize(text) == hf(text)["input_ids"], repr(text)
    llm = Llama(model_path=str(path), n_ctx=128, n_threads=1, logits_all=True, flash_attn=False, type_k=0, type_v=0,
                verbose=False)
    ids = llm.tokenize(b"The circle is red and the square is", add_bos=True, special=True)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    mine = np.stack([ours.prefill([Segment.tokens(ids[n : n + 1], n)]).copy() for n in range(len(ids))])
    assert np.abs(mine - theirs).max() <= 1e-4 * np.abs(theirs).max()


def test_verify_passes_every_artifact_of_an_internvl_bundle(new_bundles, capsys):
    import json

    from edgevlm.cli import main

    code = main(["verify", str(new_bundles["internvl"]), "--threads", "1", "--json"])
    rows = {r["artifact"]: r for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]}
    assert code == 3, rows  # random weights: the quantized gates cannot judge them (docs/parity-ladder.md): exit 3
    assert rows["onnx:fp32"]["max_rel_err"] <= 1e-4
    assert rows["gguf:f32"]["nmse"] <= 1e-5 and rows["gguf:f32"]["greedy_agreement"] == 1.0
    assert rows["mlx:fp32"]["nmse"] <= 1e-5
    assert all(r["status"] in ("pass", "unjudged") for r in rows.values()), rows  # nothing failed
    assert all(rows[name]["status"] == "pass" for name in ("tokenizer", "onnx:fp32", "gguf:f32", "mlx:fp32")), rows
    assert main(["verify", str(new_bundles["internvl"]), "--threads", "1", "--allow-skips"]) == 0


def test_inspect_lists_families_and_decoder_rows(ckpts, capsys):
    import json

    from edgevlm.cli import main

    assert main(["inspect", "--supported", "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {f["architecture"]: f["family"] for f in info["families"]}["SmolVLMForConditionalGeneration"] == "idefics3"
    rows = {d["name"]: d for d in info["decoders"]}
    assert rows["qwen2"]["gguf_arch"] == "qwen2" and rows["qwen2"]["permute_qk"] is False
    assert rows["llama"]["permute_qk"] is True
    assert main(["inspect", str(ckpts["internvl"]), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["family"] == "internvl" and summary["decoder"]["architecture"] == "qwen2"
    assert summary["image_layout"]["start_token"] == "<img>" and summary["resize_rule"] == "internvl"


@pytest.mark.parametrize("family", ["smolvlm2", "internvl"])
def test_torch_free_tokenizer_and_template_equal_transformers(family, new_bundles):
    """The runtime's own tokenizer (tokenizers + jinja2) on Qwen2's NFC + regex-split pre-tokenizer and InternVL's
    named special tokens, and SmolVLM2's template with its video branch."""
    from test_tokenizer import TEXTS, conversations
    from transformers import AutoTokenizer

    from edgevlm.runtimes.tokenizer import BundleTokenizer

    manifest = Manifest.load(new_bundles[family])
    folder = new_bundles[family] / manifest.tokenizer["path"]
    hf, ours = AutoTokenizer.from_pretrained(folder), BundleTokenizer(folder)
    for text in TEXTS + STRINGS + ["<img><IMG_CONTEXT></img>\n", "ﬁ composed é vs e\u0301"]:
        for special in (True, False):
            ids = hf(text, add_special_tokens=special)["input_ids"]
            assert ours(text, add_special_tokens=special)["input_ids"] == ids, (text, special)
            assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), text
    for messages in conversations():
        template = manifest.tokenizer["chat_template"]
        assert ours.apply_chat_template(messages, chat_template=template, add_generation_prompt=True) == \
            hf.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
