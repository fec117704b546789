"""Qwen3-VL through the qwen3_vl family: pixels, ids and M-RoPE positions equal HF's, the torch runtime's greedy
tokens equal model.generate (one image, two images of different sizes), and the tiny checkpoint tells right from
wrong: its greedy tokens change with the image and when the DeepStack slices are dropped."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_image

import builders
from edgevlm.families import describe_checkpoint, load_checkpoint
from edgevlm.loading import session_from_checkpoint
from edgevlm.preprocess import preprocess, tile_grid
from edgevlm.runtimes.torch_backend import TorchEncoder

PAD = "<|image_pad|>"


@pytest.fixture(scope="module")
def qwen3_ckpt(tmp_path_factory):
    return builders.build_qwen3_vl(tmp_path_factory.mktemp("qwen3-vl") / "ckpt", seed=3)


@pytest.fixture(scope="module")
def ckpt(qwen3_ckpt):
    return load_checkpoint(qwen3_ckpt)


@pytest.fixture(scope="module")
def pics():
    # 100x40 -> smart_resize to a 2x2 merged grid (its area is below min_pixels); 150x230 -> 7x5; 300x200 -> 6x9
    return {"wide": random_image(21, 100, 40), "tall": random_image(22, 150, 230), "big": random_image(23, 300, 200)}


def hf_inputs(ckpt, path, images, text):
    """HF's inputs for `text` (one <|image_pad|> per image): Qwen3VLProcessor needs torchvision for its video half,
    so its own expansion (processing_qwen3_vl.replace_image_token: image_pad x grid.prod() // merge**2) is applied
    with the image processor's grids, and mm_token_type_ids (1 = image token) as the processor returns it."""
    from transformers import AutoImageProcessor

    out = AutoImageProcessor.from_pretrained(path)(images=images, return_tensors="pt")
    pieces = text.split(PAD)
    merge = ckpt.preprocess.merge_size
    expanded = pieces[0] + "".join(PAD * int(g.prod() // merge**2) + piece for g, piece in zip(out["image_grid_thw"], pieces[1:]))
    ids = ckpt.tokenizer(expanded, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": out["pixel_values"],
            "image_grid_thw": out["image_grid_thw"],
            "mm_token_type_ids": (ids == ckpt.hf_model.config.image_token_id).int()}


def test_describe_reads_the_checkpoint_without_torch(qwen3_ckpt):
    spec = describe_checkpoint(qwen3_ckpt)
    assert (spec.family, spec.decoder_architecture, spec.position_scheme) == ("qwen3_vl", "qwen3vl", "mrope")
    assert spec.mrope_section == (3, 3, 2) and spec.deepstack_layers == 2
    assert (spec.preprocess.patch_size, spec.preprocess.merge_size, spec.preprocess.tile_size) == (16, 2, (32, 32))
    assert spec.image_tokens(230, 150) == 5 * 7


def test_pixels_equal_the_hf_pil_processor(qwen3_ckpt):
    from transformers import AutoImageProcessor

    hf = AutoImageProcessor.from_pretrained(qwen3_ckpt)
    assert type(hf).__name__ == "Qwen2VLImageProcessorPil"
    spec = describe_checkpoint(qwen3_ckpt).preprocess
    resized = 0
    for i, (width, height) in enumerate([(64, 64), (100, 40), (150, 230), (300, 200), (257, 31), (33, 190), (400, 300)]):
        image = random_image(40 + i, width, height)
        ref = hf(images=[image], return_tensors="np")
        ours = preprocess(image, spec)
        assert ours.pixel_values.shape == ref["pixel_values"].shape
        assert np.abs(ours.pixel_values - ref["pixel_values"]).max() <= 1e-6, (width, height)
        assert ours.grid == tuple(ref["image_grid_thw"][0].tolist())
        assert (ours.rows, ours.cols) == tile_grid(height, width, spec) == (ours.grid[1] // 2, ours.grid[2] // 2)
        resized += (ours.grid[1] * 16, ours.grid[2] * 16) != (round(height / 32) * 32, round(width / 32) * 32)
    assert resized >= 2  # smart_resize's rescales (under min_pixels, over max_pixels) were exercised


def test_encoder_rows_are_hf_features_then_deepstack_slices(ckpt, pics):
    pre = preprocess(pics["tall"], ckpt.preprocess)
    rows = TorchEncoder(ckpt.vision, "t").encode(pre.pixel_values, grid=pre.grid)
    with torch.inference_mode():
        out = ckpt.hf_model.model.get_image_features(torch.from_numpy(pre.pixel_values), torch.tensor([pre.grid]))
    expected = torch.cat([out.pooler_output[0], *(f[0] for f in out.deepstack_features)], dim=-1).numpy()
    assert rows.shape == (35, 64 * 3) and np.array_equal(rows, expected)


def test_ids_and_positions_equal_hf(ckpt, qwen3_ckpt, pics):
    session = session_from_checkpoint(ckpt)
    images = [pics["wide"], pics["tall"]]
    text = session.render([session.user_message(f"First {PAD} then {PAD} which is taller?", 2)])
    hf = hf_inputs(ckpt, qwen3_ckpt, images, text)
    prompt = session.tokenize(text, [session._prepare_image(im) for im in images])
    assert prompt.ids.tolist() == hf["input_ids"][0].tolist()
    position_ids, _ = ckpt.hf_model.model.get_rope_index(hf["input_ids"], hf["mm_token_type_ids"],
                                                          hf["image_grid_thw"], None, hf["attention_mask"])
    assert prompt.positions.positions.T.tolist() == position_ids[:, 0].tolist()  # (3, L)


def _hf_generate(ckpt, path, images, text, max_new_tokens):
    inputs = hf_inputs(ckpt, path, images, text)
    ckpt.hf_model.generation_config.eos_token_id = None
    with torch.inference_mode():
        out = ckpt.hf_model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("n_images", [1, 2])
def test_torch_greedy_tokens_equal_model_generate(n_images, ckpt, qwen3_ckpt, pics):
    session = session_from_checkpoint(ckpt)
    images = [pics["tall"], pics["big"]][:n_images]
    question = f"Look {PAD} " + (f"and {PAD} " if n_images == 2 else "") + "describe it."
    text = session.render([session.user_message(question, n_images)])
    expected = _hf_generate(ckpt, qwen3_ckpt, images, text, 16)
    assert session.generate(images, question, max_tokens=16, stop_token_ids=[]).tokens == expected


class _DropDeepStack(TorchEncoder):
    """The encoder with its DeepStack slices zeroed: what a runtime that ignores them would compute."""

    def encode(self, pixel_values, grid=None):
        rows = super().encode(pixel_values, grid).copy()
        rows[:, 64:] = 0.0
        return rows


def test_the_tiny_model_tells_images_and_deepstack_apart(ckpt, pics):
    question = f"Describe {PAD} in detail."
    session = session_from_checkpoint(ckpt)
    tokens = session.generate(pics["tall"], question, max_tokens=16, stop_token_ids=[]).tokens
    other = session_from_checkpoint(ckpt).generate(random_image(99, 150, 230), question, max_tokens=16,
                                                   stop_token_ids=[]).tokens
    assert other != tokens  # the image matters
    dropped = session_from_checkpoint(ckpt)
    dropped.encoder = _DropDeepStack(ckpt.vision, "no-deepstack")
    assert dropped.generate(pics["tall"], question, max_tokens=16, stop_token_ids=[]).tokens != tokens


@pytest.fixture(scope="module")
def qwen3_bundle(qwen3_ckpt, tmp_path_factory):
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint

    encoders = [ArtifactRequest("onnx", p) for p in ("fp32", "fp16", "int8")] + [
        ArtifactRequest("mmproj", p) for p in ("f32", "f16")]
    decoders = [ArtifactRequest("gguf", "f32"), ArtifactRequest("gguf", "q8_0"), ArtifactRequest("mlx", "fp32"),
                ArtifactRequest("mlx", "8bit")]
    return export_checkpoint(qwen3_ckpt, tmp_path_factory.mktemp("qwen3-vl-bundle") / "b", encoders, decoders,
                             max_tiles=8, options={"group_size": 32})


def _bundle_session(bundle, decoder: str = "gguf:f32", n_batch: int | None = None):
    import edgevlm
    from edgevlm.manifest import Manifest
    from edgevlm.runtimes.llamacpp import open_decoder

    session = edgevlm.load(bundle, encoder="onnx:fp32", decoder=decoder, threads=1,
                           parity=decoder.startswith("gguf"))
    if n_batch is not None:  # the same GGUF, prefilled in batches of n_batch
        path = bundle / Manifest.load(bundle).find("decoder", decoder).path
        session.decoder = open_decoder(path, n_ctx=session.decoder.n_ctx, threads=1, n_batch=n_batch, parity=True)
    return session


def test_f32_gguf_takes_deepstack_rows_and_matches_pytorch(ckpt, qwen3_bundle, pics):
    """llama.cpp's qwen3vl arch: image rows n_embd x (1 + k) wide (main embedding, then the k DeepStack slices),
    interleaved M-RoPE sections [3, 3, 2, 0]; greedy tokens and logits equal the PyTorch reference, in one batch and
    with the image rows cut into batches of 7."""
    import gguf

    from edgevlm.manifest import Manifest
    from edgevlm.verify import DECODER_NMSE, nmse

    manifest = Manifest.load(qwen3_bundle)
    assert manifest.encoder.row_slices == 3 and manifest.encoder.output_shape == ["merged", 192]
    reader = gguf.GGUFReader(str(qwen3_bundle / manifest.find("decoder", "gguf:f32").path))
    assert reader.fields["general.architecture"].contents() == "qwen3vl"
    assert reader.fields["qwen3vl.rope.dimension_sections"].contents() == [3, 3, 2, 0]
    assert reader.fields["qwen3vl.n_deepstack_layers"].contents() == 2
    assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= {t.name for t in reader.tensors}
    images = [pics["tall"], pics["big"]]
    question = f"First {PAD} second {PAD} which is bigger?"
    options = dict(max_tokens=24, stop_token_ids=[], return_logits=True)
    ref = session_from_checkpoint(ckpt).generate(images, question, **options)
    for n_batch in (None, 7):
        ours = _bundle_session(qwen3_bundle, n_batch=n_batch).generate(images, question, **options)
        assert ours.tokens == ref.tokens, n_batch
        assert nmse(np.stack(ours.logits), np.stack(ref.logits)) <= DECODER_NMSE, n_batch


def test_mlx_fp32_takes_deepstack_rows_and_matches_pytorch(ckpt, qwen3_bundle, pics):
    """mlx-vlm's qwen3_vl language model over mlx-lm's qwen3 folder: interleaved sections and DeepStack adds."""
    from edgevlm.verify import DECODER_NMSE, nmse

    images = [pics["tall"], pics["big"]]
    question = f"First {PAD} second {PAD} which is bigger?"
    options = dict(max_tokens=24, stop_token_ids=[], return_logits=True)
    ref = session_from_checkpoint(ckpt).generate(images, question, **options)
    ours = _bundle_session(qwen3_bundle, "mlx:fp32").generate(images, question, **options)
    assert ours.tokens == ref.tokens
    assert nmse(np.stack(ours.logits), np.stack(ref.logits)) <= DECODER_NMSE


@pytest.mark.parametrize("decoder", ["gguf:q8_0", "mlx:8bit"])
def test_8bit_decoders_keep_top1_agreement(decoder, ckpt, qwen3_bundle, pics):
    """Teacher-forced on the PyTorch reference's greedy tokens (2 images x 48 tokens): >= 95% pooled."""
    reference = session_from_checkpoint(ckpt)
    ours = _bundle_session(qwen3_bundle, decoder)
    agree = []
    for image, question in ((pics["tall"], f"Describe {PAD} in detail."), (pics["big"], f"What is {PAD}?")):
        tokens = reference.generate(image, question, max_tokens=48, stop_token_ids=[]).tokens
        agree += [int(np.argmax(x)) == t for x, t in zip(ours.teacher_forced_logits(image, question, tokens), tokens)]
    assert len(agree) == 96 and np.mean(agree) >= 0.95, f"{decoder}: {np.mean(agree):.1%} top-1 agreement"


def test_caches_keep_deepstack_rows(qwen3_bundle, pics):
    """An embedding-cache hit and a prefix hit give the cold run's tokens (the cached rows keep their slices)."""
    question = f"What is in {PAD} this picture?"
    cold = _bundle_session(qwen3_bundle).generate(pics["tall"], question, max_tokens=12, stop_token_ids=[]).tokens
    session = _bundle_session(qwen3_bundle)
    session.generate(pics["tall"], question, max_tokens=2, stop_token_ids=[])
    hit = session.generate(pics["tall"], "Describe " + PAD + " again.", max_tokens=12, stop_token_ids=[])
    assert hit.timings["embed_cache_hits"] == 1
    assert hit.tokens == _bundle_session(qwen3_bundle).generate(pics["tall"], "Describe " + PAD + " again.",
                                                                 max_tokens=12, stop_token_ids=[]).tokens
    again = session.generate(pics["tall"], question, max_tokens=12, stop_token_ids=[])
    assert again.timings["prefix_cache_hits"] == 1 and again.tokens == cold


def _hf_rows(ckpt, pre) -> np.ndarray:
    """HF's get_image_features for one image: its pooler output, then its DeepStack features."""
    with torch.inference_mode():
        out = ckpt.hf_model.model.get_image_features(torch.from_numpy(pre.pixel_values), torch.tensor([pre.grid]))
    return torch.cat([out.pooler_output[0], *(f[0] for f in out.deepstack_features)], dim=-1).numpy()


def test_one_onnx_graph_serves_every_image_size(ckpt, qwen3_bundle):
    """The ViT (learned position table resampled to the grid: bilinear taps as graph inputs; 2-D RoPE), the merger and
    the DeepStack mergers in one graph with a dynamic patch axis: fp32 within 1e-4 (max relative) of HF's
    get_image_features, DeepStack slices included, at sizes square, wide, tall, tiny and rescaled; fp16 and int8 at
    cosine >= 0.999 / 0.99."""
    from edgevlm.manifest import Manifest
    from edgevlm.runtimes.bundle_loader import make_encoder
    from edgevlm.verify import cosine, max_rel_err

    manifest = Manifest.load(qwen3_bundle)
    assert [i["name"] for i in manifest.encoder.inputs] == ["pixel_patches", "vision_pos", "pos_embed_ids",
                                                            "pos_embed_weights"]
    encoders = {name: make_encoder(qwen3_bundle, manifest, name, threads=1)
                for name in ("onnx:fp32", "onnx:fp16", "onnx:int8")}
    for i, (width, height) in enumerate([(64, 64), (150, 230), (300, 200), (1000, 40), (100, 40)]):
        pre = preprocess(random_image(60 + i, width, height), ckpt.preprocess)
        ref = _hf_rows(ckpt, pre)
        assert max_rel_err(encoders["onnx:fp32"].encode(pre.pixel_values, grid=pre.grid), ref) <= 1e-4, (width, height)
        assert cosine(encoders["onnx:fp16"].encode(pre.pixel_values, grid=pre.grid), ref) >= 0.999
        assert cosine(encoders["onnx:int8"].encode(pre.pixel_values, grid=pre.grid), ref) >= 0.99


def test_verify_passes_the_bundle(qwen3_bundle):
    """`edgevlm verify`: every artifact against the PyTorch reference (the quantized ones unjudged on random
    weights, never failed), every encoder x decoder pair end to end."""
    from edgevlm.verify import verify_report

    rows = verify_report(qwen3_bundle, threads=1)["rows"]
    status = {row["artifact"]: row["status"] for row in rows}
    assert status["onnx:fp32"] == status["gguf:f32"] == status["onnx:fp32 + gguf:f32"] == "pass", status
    assert status["mmproj:f32"] == status["mmproj:f16"] == "pass", status  # libmtmd on a whole-block probe
    assert "FAIL" not in status.values(), status
    assert {"onnx:int8", "gguf:q8_0", "onnx:int8 + gguf:q8_0"} <= set(status)


def test_qwen3_vl_2b_preset_plan():
    """The preset's planner figures: the tower + mergers' parameters by formula equal transformers' model at those
    shapes (built on the meta device: no memory), 512x512 -> 16x16 merged = 256 image tokens, the vision FLOPs of
    compute.vision_flops_per_tile's formula, and the preset's files described as a checkpoint's (special-token ids)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from edgevlm.plan.bundle import PlanRequest, plan_model
    from edgevlm.plan.devices import get_device
    from edgevlm.plan.model import from_preset
    from edgevlm.reference.preset_configs import preset_files
    from edgevlm.reference.presets import PRESETS

    shape, shapes = PRESETS["qwen3-vl-2b"], from_preset("qwen3-vl-2b")
    config, processor, vocabulary = preset_files(shape)
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(
            vision_config=config["vision_config"], image_token_id=151655, tie_word_embeddings=True,
            text_config=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                             num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True)))
    visual = model.model.visual
    mergers = sum(p.numel() for m in (visual.merger, visual.deepstack_merger_list) for p in m.parameters())
    assert (shapes.vision.params, shapes.vision.projector_params) == (sum(p.numel() for p in visual.parameters()),
                                                                      mergers)
    decoder = sum(p.numel() for p in model.model.language_model.parameters())
    assert 1.7e9 < decoder < 1.8e9 and shapes.decoder.head_dim == 128  # Qwen3-1.7B-shaped, tied
    assert (shapes.family, shapes.decoder.architecture, shapes.layout.image_token_id) == ("qwen3_vl", "qwen3vl", 151655)
    assert vocabulary.id_of("<|vision_start|>") == 151652 and vocabulary.id_of("<|im_end|>") == 151645
    result = plan_model(shapes, get_device("jetson-orin-nano-8gb"), PlanRequest(image_size=(512, 512)))
    images = result["images"]
    assert (images["kind"], images["positions"], images["patches"], images["encoder_calls"]) == ("grid", 256, 1024, 1)
    v, merged, patches = shapes.vision, 256, 1024
    flops = 2 * patches * (v.params - v.projector_params) + 4 * v.layers * patches**2 * v.width + 2 * merged * mergers
    assert result["model"]["vision_gflops_per_image"] * 1e9 == pytest.approx(flops)


def _mtmd_prompt(session, image, question: str):
    """edgevlm's rendered prompt with mtmd's marker where the image goes (mtmd adds <|vision_start|> /
    <|vision_end|> around a qwen image itself), plus edgevlm's own token ids."""
    from edgevlm.bench.peers.mtmd import media_prompt
    from edgevlm.runtimes.prompt import prepare_image

    text = session.render([session.user_message(question, 1)])
    ids = session.tokenize(text, [prepare_image(session.spec, image, "probe")]).ids
    return media_prompt(text, PAD, "qwen3vl_merger", "{marker}"), ids


# sizes whose smart_resize keeps the aspect ratio and stays above min_pixels: there mtmd's resize gives HF's pixels
MTMD_SIZES = [(300, 200), (256, 128)]


@pytest.mark.parametrize("size", MTMD_SIZES)
def test_libmtmd_encodes_like_pytorch(size, ckpt, qwen3_bundle):
    """libmtmd loads edgevlm's qwen3vl_merger mmproj, lays the prompt out with HF's ids (image chunks where edgevlm
    puts image rows) and encodes rows n_embd x (1 + k) wide: the merger's output and both DeepStack slices at cosine
    >= 0.999 (F32 and F16) against the PyTorch encoder."""
    from edgevlm.bench.peers.mtmd import MtmdPipeline
    from edgevlm.manifest import Manifest
    from edgevlm.metrics import cosine

    manifest = Manifest.load(qwen3_bundle)
    session = _bundle_session(qwen3_bundle)
    image = random_image(11, *size)
    text, ids = _mtmd_prompt(session, image, f"What is {PAD} in the picture?")
    pre = preprocess(image, manifest.preprocess)
    reference = TorchEncoder(ckpt.vision, "t").encode(pre.pixel_values, grid=pre.grid)  # (M, 3 * 64)
    for precision in ("f32", "f16"):
        pipeline = MtmdPipeline(qwen3_bundle / manifest.find("decoder", "gguf:f32").path,
                                qwen3_bundle / f"encoder/mmproj-{precision}.gguf", n_ctx=512, threads=1, parity=True)
        tokenized = pipeline.tokenize(text.format(marker=pipeline.marker), [np.asarray(image)])
        laid_out = []
        for chunk in tokenized.chunks:
            laid_out += list(chunk.token_ids) if chunk.kind == "text" else [manifest.image_layout.image_token_id] * chunk.n_tokens
        assert laid_out == ids.tolist(), precision
        (rows,), _ = pipeline.encode(tokenized)
        assert rows.shape == reference.shape
        for part in range(3):  # the merger's rows, then each DeepStack slice
            sliced = np.s_[:, 64 * part: 64 * (part + 1)]
            assert cosine(rows[sliced], reference[sliced]) >= 0.999, (precision, part)
        pipeline.free(tokenized)
        pipeline.close()


def test_mtmd_greedy_tokens_equal_edgevlm(qwen3_bundle):
    """llama.cpp's own multimodal path (mtmd tokenize, encode, its helpers decoding the wide image rows, its sampler)
    on the F32 mmproj + F32 decoder GGUF gives edgevlm's greedy tokens on the same GGUF."""
    from edgevlm.bench.peers.mtmd import MtmdPipeline
    from edgevlm.manifest import Manifest

    manifest = Manifest.load(qwen3_bundle)
    session = _bundle_session(qwen3_bundle)
    image = random_image(12, *MTMD_SIZES[0])
    question = f"Describe {PAD} please."
    ours = session.generate(image, question, max_tokens=16, stop_token_ids=[]).tokens
    text, _ = _mtmd_prompt(session, image, question)
    pipeline = MtmdPipeline(qwen3_bundle / manifest.find("decoder", "gguf:f32").path,
                            qwen3_bundle / "encoder/mmproj-f32.gguf", n_ctx=512, threads=1, parity=True)
    pipeline.prefill(pipeline.tokenize(text.format(marker=pipeline.marker), [np.asarray(image)]))
    theirs, _ = pipeline.generate(16)
    pipeline.close()
    assert theirs == ours


def test_manifest_checks_the_row_slices_against_the_decoder(qwen3_bundle):
    """A manifest whose rows would not split into the decoder's slices is refused at load, naming the fields."""
    import json

    from edgevlm.errors import BundleError
    from edgevlm.manifest import Manifest

    data = json.loads((qwen3_bundle / "manifest.json").read_text())
    for slices, match in ((1, "row_slices x decoder.hidden_size = 1 x 64"), (9, "needs 8 DeepStack layers"),
                          (0, "encoder.row_slices")):
        broken = json.loads(json.dumps(data))
        broken["encoder"]["row_slices"] = slices
        with pytest.raises(BundleError, match=match):
            Manifest.from_dict(broken)


def test_disk_tier_and_a_second_sequence_keep_deepstack_rows(qwen3_bundle, pics, tmp_path):
    """A restart with the same --cache-dir reads the image's rows (DeepStack slices included) and its prefix state from
    disk: no encode, a prefix hit, the cold tokens; `serve --parallel`'s second sequence answers as a fresh session."""
    import edgevlm
    from bundle_checks import assert_disk_tier_restores

    question = f"What is in {PAD} this picture?"
    cold = assert_disk_tier_restores(lambda: _bundle_session(qwen3_bundle), pics["tall"], question, 12,
                                     tmp_path / "cache")
    parallel = edgevlm.load(qwen3_bundle, encoder="onnx:fp32", decoder="gguf:f32", threads=1, parity=True, n_seq=2)
    sibling = parallel.sibling(parallel.decoder.context.sequence(1))
    parallel.generate(pics["big"], question, max_tokens=4, stop_token_ids=[])
    assert sibling.generate(pics["tall"], question, max_tokens=12, stop_token_ids=[]).tokens == cold
