"""Gemma 3 through the gemma3 family: pixels and ids equal HF's Gemma3Processor (several sizes, non-square,
pan-and-scan on and off), the torch runtime's greedy tokens equal model.generate (one image, two images, with HF's
bidirectional image mask), and the tiny model is discriminative: another image, or the image block run causally,
changes its greedy tokens."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_image

import builders_gemma3
from edgevlm.families import describe_checkpoint, load_checkpoint
from edgevlm.loading import session_from_checkpoint
from edgevlm.preprocess import preprocess

BOI = "<start_of_image>"


@pytest.fixture(scope="module")
def gemma_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma3")
    return {"plain": builders_gemma3.build_gemma3(root / "plain", seed=5),
            "pas": builders_gemma3.build_gemma3(root / "pas", seed=5, pan_and_scan=True)}


@pytest.fixture(scope="module")
def pics():
    # square; wide (100/40 = 2.5 rounds to 3 crops) and tall (130/50 = 2.6: 3 crops) under pan-and-scan; near-square
    return {"square": random_image(31, 64, 64), "wide": random_image(32, 100, 40), "tall": random_image(33, 50, 130),
            "near": random_image(34, 70, 64)}


def _hf_inputs(path, images, text):
    """Gemma3Processor's own defaults (pan-and-scan off, 256-px crops) outrank the image processor's saved settings,
    so the checkpoint's settings are passed as a caller would."""
    processor = builders_gemma3.gemma3_processor(path)
    saved = processor.image_processor
    options = {k: getattr(saved, k) for k in ("do_pan_and_scan", "pan_and_scan_min_crop_size",
                                              "pan_and_scan_max_num_crops", "pan_and_scan_min_ratio_to_activate")}
    return processor(images=images, text=text, return_tensors="pt", **options)


@pytest.mark.parametrize("kind", ["plain", "pas"])
def test_pixels_and_ids_equal_hf(kind, gemma_ckpts, pics):
    path = gemma_ckpts[kind]
    ckpt = load_checkpoint(path)
    assert ckpt.family == "gemma3" and ckpt.spec.image_attention == "bidirectional"
    session = session_from_checkpoint(ckpt)
    processor = builders_gemma3.gemma3_processor(path)
    crops = []
    for name in ("square", "wide", "tall", "near"):
        image = pics[name]
        hf = processor.image_processor(images=[image], return_tensors="np")
        ours = preprocess(image, ckpt.preprocess)
        assert ours.pixel_values.shape == hf["pixel_values"].shape
        assert np.array_equal(ours.pixel_values, hf["pixel_values"])
        crops.append(int(hf["num_crops"][0]))
    assert crops == ([0, 0, 0, 0] if kind == "plain" else [0, 3, 3, 0])  # square and near-square stay whole
    images = [pics["wide"], pics["tall"]]
    text = session.render([session.user_message(f"First {BOI} then {BOI} which is taller?", 2)])
    hf = _hf_inputs(path, images, text)
    prompt = session.tokenize(text, [session._prepare_image(im) for im in images])
    assert prompt.ids.tolist() == hf["input_ids"][0].tolist()
    # the runs of image rows are HF's token-type blocks, one per tile
    blocks = [(s, e) for s, e, _, _ in prompt.runs]
    types = hf["token_type_ids"][0].numpy()
    assert blocks == _runs(types)


def _runs(types: np.ndarray) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, t in enumerate(list(types) + [0]):
        if t == 1 and start is None:
            start = i
        elif t != 1 and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _generate_hf(ckpt, path, images, text, causal_images: bool = False, max_new_tokens: int = 16) -> list[int]:
    inputs = _hf_inputs(path, images, text)
    if causal_images:
        inputs.pop("token_type_ids")
    ckpt.hf_model.generation_config.eos_token_id = None
    with torch.inference_mode():
        out = ckpt.hf_model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("n_images", [1, 2])
def test_torch_greedy_tokens_equal_model_generate(n_images, gemma_ckpts, pics):
    path = gemma_ckpts["pas"]
    ckpt = load_checkpoint(path)
    session = session_from_checkpoint(ckpt)
    images = [pics["wide"], pics["square"]][:n_images]
    question = f"Look {BOI} " + (f"and {BOI} " if n_images == 2 else "") + "describe it."
    text = session.render([session.user_message(question, n_images)])
    expected = _generate_hf(ckpt, path, images, text)
    assert session.generate(images, question, max_tokens=16, stop_token_ids=[]).tokens == expected


def test_tiny_model_is_discriminative(gemma_ckpts, pics):
    """Another image changes the greedy tokens, and so does running the image block causally (HF without token
    types): a runtime that got either wrong could not pass the parity tests."""
    path = gemma_ckpts["plain"]
    ckpt = load_checkpoint(path)
    session = session_from_checkpoint(ckpt)
    text = session.render([session.user_message("Describe the image.", 1)])
    tokens = {name: _generate_hf(ckpt, path, [pics[name]], text) for name in ("square", "near")}
    assert tokens["square"] != tokens["near"]
    assert _generate_hf(ckpt, path, [pics["square"]], text, causal_images=True) != tokens["square"]
    assert session.generate(pics["square"], "Describe the image.", max_tokens=16, stop_token_ids=[]).tokens == \
        tokens["square"]


def test_describe_is_torch_free_and_refuses_text_only(gemma_ckpts, tmp_path):
    import json

    from edgevlm.errors import CheckpointError

    spec = describe_checkpoint(gemma_ckpts["plain"])
    assert spec.tokens_per_tile == 16 and spec.mmproj_projector == "gemma3" and spec.decoder_architecture == "gemma3"
    assert spec.image_tokens(100, 40) == 16
    assert describe_checkpoint(gemma_ckpts["pas"]).image_tokens(100, 40) == 4 * 16  # the whole image + 3 crops
    text_only = tmp_path / "gemma3-1b"
    text_only.mkdir()
    (text_only / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForCausalLM"],
                                                       "model_type": "gemma3_text"}))
    with pytest.raises(CheckpointError, match="text-only Gemma 3"):
        describe_checkpoint(text_only)


@pytest.fixture(scope="module")
def gemma_bundle(gemma_ckpts, tmp_path_factory):
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint

    root = tmp_path_factory.mktemp("gemma3-bundles")
    decoders = [ArtifactRequest("gguf", "f32"), ArtifactRequest("gguf", "q8_0"), ArtifactRequest("mlx", "fp32")]
    return export_checkpoint(gemma_ckpts["pas"], root / "pas", [ArtifactRequest("onnx", "fp32")], decoders)


def _bundle_session(bundle, decoder: str = "gguf:f32", **options):
    import edgevlm

    return edgevlm.load(bundle, encoder="onnx:fp32", decoder=decoder, threads=1, parity=True, **options)


def test_f32_gguf_matches_the_torch_reference(gemma_ckpts, gemma_bundle, pics):
    """Arch gemma3 through gguf-py's names ((1 + w) norms shifted, QK-norm, sandwich norms, tied head), the image
    rows unscaled and decoded with causal attention off in one micro-batch: greedy tokens equal the torch
    reference's and the logits agree to NMSE <= 1e-5 (two images, one with pan-and-scan crops)."""
    import gguf

    import edgevlm
    from edgevlm.verify import DECODER_NMSE, nmse

    reader = gguf.GGUFReader(str(gemma_bundle / "decoder" / "f32.gguf"))
    assert reader.fields["general.architecture"].contents() == "gemma3"
    assert reader.fields["gemma3.attention.sliding_window"].contents() == 128
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_q_norm.weight", "blk.0.post_attention_norm.weight", "blk.0.post_ffw_norm.weight"} <= names
    assert "output.weight" not in names  # tied
    images = [pics["wide"], pics["square"]]
    question = f"First {BOI} second {BOI} which is bigger?"
    options = dict(max_tokens=24, stop_token_ids=[], return_logits=True)
    ref = edgevlm.load(gemma_ckpts["pas"]).generate(images, question, **options)
    ours = _bundle_session(gemma_bundle).generate(images, question, **options)
    assert ours.tokens == ref.tokens
    assert nmse(np.stack(ours.logits), np.stack(ref.logits)) <= DECODER_NMSE


def test_gguf_image_block_is_bidirectional_and_refuses_a_split(gemma_bundle, pics):
    """The same GGUF with the image rows run causally gives other tokens (what the test above would catch); an image
    block larger than the micro-batch is refused in one line instead of being cut."""
    from edgevlm.errors import BadInputError
    from edgevlm.manifest import Manifest
    from edgevlm.runtimes.llamacpp import open_decoder

    question = f"Describe {BOI} please."
    bidirectional = _bundle_session(gemma_bundle).generate(pics["square"], question, max_tokens=16, stop_token_ids=[])
    causal = _bundle_session(gemma_bundle)
    path = gemma_bundle / Manifest.load(gemma_bundle).find("decoder", "gguf:f32").path
    causal.decoder = open_decoder(path, n_ctx=causal.decoder.n_ctx, threads=1, parity=True)
    assert causal.generate(pics["square"], question, max_tokens=16, stop_token_ids=[]).tokens != bidirectional.tokens
    small = _bundle_session(gemma_bundle)
    small.decoder = open_decoder(path, n_ctx=small.decoder.n_ctx, threads=1, parity=True, n_batch=8,
                                 image_attention="bidirectional")
    with pytest.raises(BadInputError, match="must fit one llama.cpp micro-batch"):
        small.generate(pics["square"], question, max_tokens=4, stop_token_ids=[])


def test_onnx_fp32_equals_hf_get_image_features(gemma_ckpts, gemma_bundle, pics):
    """SigLIP + 4x4 average pool + soft-embedding RMSNorm + projector in one graph: the whole image and its
    pan-and-scan crops (one batch of tiles) within 1e-4 relative of Gemma3Model.get_image_features."""
    from edgevlm.manifest import Manifest
    from edgevlm.runtimes.onnx_encoder import OnnxRuntimeEncoder

    ckpt = load_checkpoint(gemma_ckpts["pas"])
    manifest = Manifest.load(gemma_bundle)
    encoder = OnnxRuntimeEncoder(gemma_bundle, manifest.find("encoder", "onnx:fp32"), manifest.encoder, threads=1)
    pixels = preprocess(pics["wide"], ckpt.preprocess).pixel_values  # 1 + 3 crops
    with torch.inference_mode():
        expected = ckpt.hf_model.model.get_image_features(torch.from_numpy(pixels)).pooler_output.numpy()
    ours = encoder.encode(pixels)
    assert ours.shape == expected.shape == (4, 16, 64)
    assert np.abs(ours - expected).max() / np.abs(expected).max() <= 1e-4


@pytest.fixture(scope="module")
def swa(tmp_path_factory):
    """The same weights with an 8-position window (shorter than every prompt here) and with a 1024-position one;
    the small-window model exported to an F32 GGUF."""
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint

    root = tmp_path_factory.mktemp("gemma3-swa")
    small = builders_gemma3.build_gemma3(root / "w8", seed=5, sliding_window=8)
    wide = builders_gemma3.build_gemma3(root / "w1024", seed=5, sliding_window=1024)
    bundle = export_checkpoint(small, root / "bundle", [ArtifactRequest("onnx", "fp32")], [ArtifactRequest("gguf", "f32")])
    return {"small": small, "wide": wide, "bundle": bundle}


def test_sliding_window_prompt_longer_than_the_window(swa, pics):
    """The window changes the greedy tokens (so the tests below can tell a wrong window), the torch runtime equals
    model.generate with it, and llama.cpp's SWA cache (local layers hold only their window) gives the same tokens
    and logits."""
    import edgevlm
    from edgevlm.verify import DECODER_NMSE, nmse

    question = "Describe the image in a few words."
    expected = {}
    for name in ("small", "wide"):
        ckpt = load_checkpoint(swa[name])
        session = session_from_checkpoint(ckpt)
        text = session.render([session.user_message(question, 1)])
        expected[name] = _generate_hf(ckpt, swa[name], [pics["square"]], text)
        assert session.generate(pics["square"], question, max_tokens=16, stop_token_ids=[]).tokens == expected[name]
    assert expected["small"] != expected["wide"]
    options = dict(max_tokens=16, stop_token_ids=[], return_logits=True)
    ref = edgevlm.load(swa["small"]).generate(pics["square"], question, **options)
    gguf_session = _bundle_session(swa["bundle"])
    assert gguf_session.decoder.context.n_swa == 8
    ours = gguf_session.generate(pics["square"], question, **options)
    assert ours.timings["n_prompt_tokens"] > 4 * 8 and ours.tokens == ref.tokens == expected["small"]
    assert nmse(np.stack(ours.logits), np.stack(ref.logits)) <= DECODER_NMSE


def _small_batch_session(bundle):
    """n_batch 16 (the image's 16 rows still fit one micro-batch): llama.cpp's SWA cache is then 256 cells (window +
    micro-batch, padded), so a prompt of ~400 positions makes the local layers overwrite their oldest ones."""
    from edgevlm.manifest import Manifest
    from edgevlm.runtimes.llamacpp import open_decoder

    session = _bundle_session(bundle)
    path = bundle / Manifest.load(bundle).find("decoder", "gguf:f32").path
    session.decoder = open_decoder(path, n_ctx=1024, threads=1, parity=True, n_batch=16, image_attention="bidirectional")
    return session


def test_sliding_window_cache_falls_back_to_a_cold_prefill(swa, pics):
    """A new prompt that shares the previous one's beginning only up to a point the local layers have dropped (more
    than a window behind the oldest position they still hold) cannot reuse the live sequence: the session prefills
    cold and answers as a fresh session and the torch reference do; a cut inside the window keeps the reuse."""
    import edgevlm

    first, second = "Describe the image. " * 50 + "Briefly.", "Describe the image. " * 10 + "Now in many words."
    reference = edgevlm.load(swa["small"]).generate(pics["square"], second, max_tokens=8, stop_token_ids=[])
    cold = _small_batch_session(swa["bundle"]).generate(pics["square"], second, max_tokens=8, stop_token_ids=[])
    assert cold.tokens == reference.tokens
    session = _small_batch_session(swa["bundle"])
    long = session.generate(pics["square"], first, max_tokens=8, stop_token_ids=[])
    end, oldest = session.decoder.n_past, session.decoder.context.oldest_kept(0)
    assert long.timings["n_prompt_tokens"] > 350 and oldest > 100  # the local layers dropped their oldest cells
    assert not session.decoder.can_truncate(oldest) and session.decoder.can_truncate(end - 4)
    again = session.generate(pics["square"], second, max_tokens=8, stop_token_ids=[])
    assert again.timings["n_reused_positions"] == 0 and again.tokens == cold.tokens
    repeat = session.generate(pics["square"], second, max_tokens=8, stop_token_ids=[])
    assert repeat.timings["n_reused_positions"] == repeat.timings["n_prompt_tokens"] - 1
    assert repeat.tokens == cold.tokens


@pytest.fixture(scope="module")
def mmproj_bundle(gemma_ckpts, tmp_path_factory):
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint

    root = tmp_path_factory.mktemp("gemma3-mmproj")
    encoders = [ArtifactRequest("onnx", "fp32"), ArtifactRequest("mmproj", "f32"), ArtifactRequest("mmproj", "f16")]
    return export_checkpoint(gemma_ckpts["plain"], root / "b", encoders, [ArtifactRequest("gguf", "f32")])


def _mtmd_text(session, question: str, marker: str) -> str:
    """edgevlm's rendered prompt with mtmd's marker where the image goes: mtmd writes <start_of_image> and
    <end_of_image> around the image itself; the blank lines Gemma3Processor adds around them stay in the text."""
    from edgevlm.bench.peers.mtmd import media_prompt

    return media_prompt(session.render([session.user_message(question, 1)]), BOI, "gemma3", marker)


class _FixedRows:
    """An encoder that returns rows computed elsewhere (here: by libmtmd from the same image)."""

    name = artifact_id = "mtmd-rows"
    graph_bytes = None

    def __init__(self, rows):
        self.rows = rows

    def encode(self, pixel_values, grid=None):
        return self.rows[None]


def test_mmproj_through_libmtmd(mmproj_bundle, pics):
    """libmtmd loads the gemma3 mmproj, lays the prompt out with HF's ids, encodes at cosine >= 0.999 (F32, F16)
    against edgevlm's encoder, and llama.cpp's own multimodal path (its helpers decode the image non-causally) gives
    edgevlm's greedy tokens on the same decoder GGUF."""
    from edgevlm.bench.peers.mtmd import MtmdPipeline
    from edgevlm.manifest import Manifest
    from edgevlm.metrics import cosine

    import edgevlm

    manifest = Manifest.load(mmproj_bundle)
    assert manifest.find("encoder", "mmproj:f16").details["projector_type"] == "gemma3"
    session = edgevlm.load(mmproj_bundle, encoder="onnx:fp32", decoder="gguf:f32", threads=1, parity=True)
    image, question = pics["square"], "Describe the image."
    ids = session.tokenize(session.render([session.user_message(question, 1)]), [session._prepare_image(image)]).ids
    reference = session.encoder.encode(preprocess(image, manifest.preprocess).pixel_values)[0]
    decoder = mmproj_bundle / manifest.find("decoder", "gguf:f32").path
    for precision in ("f32", "f16"):
        pipeline = MtmdPipeline(decoder, mmproj_bundle / f"encoder/mmproj-{precision}.gguf", n_ctx=512, threads=1,
                                parity=True)
        tokenized = pipeline.tokenize(_mtmd_text(session, question, pipeline.marker), [np.asarray(image)])
        laid_out = []
        for chunk in tokenized.chunks:
            laid_out += list(chunk.token_ids) if chunk.kind == "text" else [manifest.image_layout.image_token_id] * chunk.n_tokens
        assert laid_out == ids.tolist(), precision
        embeddings, _ = pipeline.encode(tokenized)
        assert len(embeddings) == 1 and cosine(embeddings[0], reference) >= 0.999, precision
        if precision == "f32":
            # the tiny model is sensitive enough that the two encoders' 3e-4 relative difference moves a late token,
            # so edgevlm's decoder takes mtmd's image rows: the decode paths (non-causal image block) are compared
            pipeline.prefill(tokenized)
            theirs, _ = pipeline.generate(16)
            same_rows = edgevlm.load(mmproj_bundle, encoder="onnx:fp32", decoder="gguf:f32", threads=1, parity=True)
            same_rows.encoder = _FixedRows(embeddings[0])
            assert theirs == same_rows.generate(image, question, max_tokens=16, stop_token_ids=[]).tokens
        pipeline.free(tokenized)
        pipeline.close()


def test_plan_figures_and_presets(gemma_bundle, gemma_ckpts, monkeypatch, capsys):
    """The gemma3-4b preset plans with the published shapes: 256 image rows per 896x896 image, and a KV cache where
    the 29 local layers hold only their 1024-position window (+ the 512-row micro-batch) and the 5 global layers the
    whole context; a preset of the tiny builder's shapes and the tiny checkpoint give the exported GGUF's bytes;
    a text-only Gemma 3 1B is refused in one line."""
    from edgevlm.cli import main
    from edgevlm.manifest import Manifest
    from edgevlm.plan.bundle import PlanRequest, plan_model
    from edgevlm.plan.devices import get_device
    from edgevlm.plan.model import from_checkpoint, from_preset
    from edgevlm.reference import presets
    from edgevlm.reference.preset_gemma3 import Gemma3Shape

    device = get_device("rtx-4060-8gb")
    result = plan_model(from_preset("gemma3-4b"), device, PlanRequest(context=8192, image_size=(896, 896)))
    assert result["images"]["image_rows"] == 256 and result["n_ctx"] == 8192
    kv_row = 2 * 4 * 256 * 2  # K and V, 4 KV heads of 256, f16
    assert result["options"][0]["memory"]["kv_cache"] == 5 * 8192 * kv_row + 29 * (1024 + 512) * kv_row
    monkeypatch.setitem(presets.PRESETS, "tiny-gemma3", Gemma3Shape(
        text_hidden=64, text_layers=6, text_heads=4, text_kv_heads=2, text_mlp=128, head_dim=16, vision_hidden=32,
        vision_layers=2, vision_heads=2, vision_mlp=64, patch=4, image=64, tokens_per_image=16, vocab=400,
        sliding_window=128, context=1024))
    manifest = Manifest.load(gemma_bundle)
    for shapes in (from_checkpoint(gemma_ckpts["pas"]), from_preset("tiny-gemma3")):
        weights = {o["decoder"]: o["memory"]["decoder_weights"]
                   for o in plan_model(shapes, device, PlanRequest(context=256))["options"]}
        for precision in ("f32", "q8_0"):
            gguf_file = gemma_bundle / manifest.find("decoder", f"gguf:{precision}").path
            from edgevlm.plan import budget

            assert weights[f"gguf:{precision}"] == sum(t.n_bytes for t in budget.read_gguf_tensors(gguf_file))
    assert from_preset("tiny-gemma3").vision.params == from_checkpoint(gemma_ckpts["pas"]).vision.params
    assert main(["plan", "--preset", "gemma3-1b", "--device", "rtx-4060-8gb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "text-only Gemma 3" in err[0]


def test_mlx_fp32_matches_the_torch_reference(gemma_ckpts, gemma_bundle, pics):
    """mlx-vlm's gemma3 layers under edgevlm's masks (runtimes/mlx_vlm_seam.py): the image block bidirectional and
    unscaled, local layers windowed; greedy tokens equal the torch reference's, logits NMSE <= 1e-5, also after a
    prefix-cache hit (snapshot / restore) and a chat turn that reuses the live sequence."""
    import edgevlm
    from edgevlm.verify import DECODER_NMSE, nmse

    images = [pics["wide"], pics["square"]]
    question = f"First {BOI} second {BOI} which is bigger?"
    options = dict(max_tokens=16, stop_token_ids=[], return_logits=True)
    ref = edgevlm.load(gemma_ckpts["pas"]).generate(images, question, **options)
    session = edgevlm.load(gemma_bundle, encoder="onnx:fp32", decoder="mlx:fp32")
    ours = session.generate(images, question, **options)
    assert ours.tokens == ref.tokens
    assert nmse(np.stack(ours.logits), np.stack(ref.logits)) <= DECODER_NMSE
    other = f"First {BOI} second {BOI} which one is red?"
    warm = session.generate(images, other, max_tokens=12, stop_token_ids=[])
    assert warm.timings["n_reused_positions"] > 0
    assert warm.tokens == edgevlm.load(gemma_ckpts["pas"]).generate(images, other, max_tokens=12, stop_token_ids=[]).tokens


def test_linear_rope_scaling_on_the_global_layers(tmp_path, pics):
    """Gemma 3 4B+ scale the global layers' RoPE linearly (x8); the GGUF (rope.scaling) and MLX (rope_scaling for
    gemma3_text's global layers) carry it: both equal the torch reference on a prompt long enough for positions to
    matter, and the factor changes the tokens."""
    import edgevlm
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint
    from edgevlm.verify import DECODER_NMSE, nmse

    scaled = builders_gemma3.build_gemma3(tmp_path / "x4", seed=5, global_rope_factor=4.0)
    plain = builders_gemma3.build_gemma3(tmp_path / "x1", seed=5)
    bundle = export_checkpoint(scaled, tmp_path / "b", [ArtifactRequest("onnx", "fp32")],
                               [ArtifactRequest("gguf", "f32"), ArtifactRequest("mlx", "fp32")])
    question = "Describe the image. " * 6
    options = dict(max_tokens=12, stop_token_ids=[], return_logits=True)
    ref = edgevlm.load(scaled).generate(pics["square"], question, **options)
    assert edgevlm.load(plain).generate(pics["square"], question, **options).tokens != ref.tokens
    for decoder in ("gguf:f32", "mlx:fp32"):
        ours = edgevlm.load(bundle, encoder="onnx:fp32", decoder=decoder, threads=1, parity=True).generate(
            pics["square"], question, **options)
        assert ours.tokens == ref.tokens, decoder
        assert nmse(np.stack(ours.logits), np.stack(ref.logits)) <= DECODER_NMSE, decoder


def test_cache_hits_give_the_cold_tokens(gemma_bundle, pics):
    """On the GGUF (bidirectional blocks, SWA cache): an embedding-cache hit after another image, and a prefix-cache
    restore at the image boundary, give a fresh session's tokens; `serve --parallel`'s second sequence too."""
    image, other = pics["wide"], pics["square"]
    ask = f"What is in {BOI} this picture?"
    cold = _bundle_session(gemma_bundle).generate(image, ask, max_tokens=10, stop_token_ids=[])
    session = _bundle_session(gemma_bundle)
    session.generate(image, "Describe " + BOI + " first.", max_tokens=2, stop_token_ids=[])
    session.generate(other, ask, max_tokens=2, stop_token_ids=[])
    hit = session.generate(image, ask, max_tokens=10, stop_token_ids=[])
    assert hit.timings["n_tiles"] == 0 and hit.timings["embed_cache_hits"] > 0 and hit.tokens == cold.tokens
    session.generate(other, ask, max_tokens=2, stop_token_ids=[])  # the live sequence holds another image again
    again = session.generate(image, f"What is in {BOI} this one?", max_tokens=10, stop_token_ids=[])
    fresh = _bundle_session(gemma_bundle).generate(image, f"What is in {BOI} this one?", max_tokens=10,
                                                   stop_token_ids=[])
    assert again.timings["prefix_cache_hits"] == 1 and again.tokens == fresh.tokens
    parallel = _bundle_session(gemma_bundle, n_seq=2)
    sibling = parallel.sibling(parallel.decoder.context.sequence(1))
    parallel.generate(other, ask, max_tokens=4, stop_token_ids=[])
    assert sibling.generate(image, ask, max_tokens=10, stop_token_ids=[]).tokens == cold.tokens


def test_disk_tier_keeps_the_bidirectional_prefix(gemma_bundle, pics, tmp_path):
    """A restart with the same --cache-dir reads the image rows and the image-prefix state (SWA cache) from disk: no
    encode, a prefix hit, the cold run's tokens."""
    from bundle_checks import assert_disk_tier_restores

    assert_disk_tier_restores(lambda: _bundle_session(gemma_bundle), pics["wide"], f"What is in {BOI} this picture?",
                              10, tmp_path / "cache")
