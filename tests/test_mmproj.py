"""llama.cpp's mmproj GGUF written by edgevlm: the file contract clip.cpp asserts (key types, tensor names, shapes and
types), libmtmd itself loading it and encoding images like edgevlm's PyTorch encoder, llama.cpp's own multimodal
path giving edgevlm's greedy tokens on the same decoder GGUF, and the checkpoints it refuses."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import random_image

import edgevlm
from edgevlm.cli import main
from edgevlm.errors import BadInputError
from edgevlm.manifest import Manifest
from edgevlm.metrics import cosine
from edgevlm.preprocess import preprocess
from edgevlm.runtimes.bundle_loader import source_checkpoint
from edgevlm.bench.peers.mtmd import MtmdPipeline

TOKENS = 16


@pytest.fixture(scope="module")
def mmproj_bundles(ckpts, tmp_path_factory) -> dict:
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint

    root = tmp_path_factory.mktemp("mmproj-bundles")
    encoders = [ArtifactRequest("onnx", "fp32")] + [ArtifactRequest("mmproj", p) for p in ("f32", "f16", "q8_0")]
    return {name: export_checkpoint(ckpts[name], root / name, encoders, [ArtifactRequest("gguf", "f32")], max_tiles=8)
            for name in ("idefics3", "llava-siglip")}


def read_gguf(path):
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {}
    for name, field in reader.fields.items():
        types = [gguf.GGUFValueType(t).name for t in field.types]
        fields[name] = (types, field.contents())
    tensors = {t.name: (tuple(int(x) for x in reversed(t.shape.tolist())), t.tensor_type.name) for t in reader.tensors}
    return fields, tensors


def expected_tensors(vision_config, n_layers: int, projector: dict[str, tuple]) -> dict[str, tuple]:
    d, f, p = vision_config.hidden_size, vision_config.intermediate_size, vision_config.patch_size
    n_patches = (vision_config.image_size // p) ** 2
    shapes = {"v.patch_embd.weight": (d, 3, p, p), "v.patch_embd.bias": (d,), "v.position_embd.weight": (n_patches, d)}
    for i in range(n_layers):
        for name in ("ln1", "ln2"):
            shapes |= {f"v.blk.{i}.{name}.weight": (d,), f"v.blk.{i}.{name}.bias": (d,)}
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            shapes |= {f"v.blk.{i}.{name}.weight": (d, d), f"v.blk.{i}.{name}.bias": (d,)}
        shapes |= {f"v.blk.{i}.ffn_up.weight": (f, d), f"v.blk.{i}.ffn_up.bias": (f,),
                   f"v.blk.{i}.ffn_down.weight": (d, f), f"v.blk.{i}.ffn_down.bias": (d,)}
    return shapes | projector


def test_file_contract(mmproj_bundles, ckpts):
    """Every key at the type clip.cpp asserts (u32 / f32 / bool / f32[3] / i32[]) and every tensor as it expects:
    an exact name, torch-order shape, F32 for norms, biases, embeddings and the patch conv."""
    from transformers import AutoConfig

    for name, projector_type in (("idefics3", "idefics3"), ("llava-siglip", "mlp")):
        config = AutoConfig.from_pretrained(ckpts[name])
        vc, hidden = config.vision_config, config.text_config.hidden_size
        manifest = Manifest.load(mmproj_bundles[name])
        for precision in ("f32", "f16", "q8_0"):
            artifact = manifest.find("encoder", f"mmproj:{precision}")
            assert artifact.format == "gguf-mmproj" and artifact.path == f"encoder/mmproj-{precision}.gguf"
            fields, tensors = read_gguf(mmproj_bundles[name] / artifact.path)
            assert fields["general.architecture"] == (["STRING"], "clip")
            assert fields["general.type"] == (["STRING"], "mmproj")
            assert fields["clip.has_vision_encoder"] == (["BOOL"], True)
            assert fields["clip.projector_type"] == (["STRING"], projector_type)
            assert fields["clip.use_gelu"] == (["BOOL"], True)  # SigLIP's gelu_pytorch_tanh
            u32 = {"clip.vision.image_size": vc.image_size, "clip.vision.patch_size": vc.patch_size,
                   "clip.vision.embedding_length": vc.hidden_size, "clip.vision.feed_forward_length": vc.intermediate_size,
                   "clip.vision.attention.head_count": vc.num_attention_heads, "clip.vision.projection_dim": hidden}
            for key, value in u32.items():
                assert fields[key] == (["UINT32"], value), key
            eps_type, eps = fields["clip.vision.attention.layer_norm_epsilon"]
            assert eps_type == ["FLOAT32"] and eps == pytest.approx(vc.layer_norm_eps)
            for key in ("clip.vision.image_mean", "clip.vision.image_std"):
                assert fields[key][0] == ["ARRAY", "FLOAT32"] and len(fields[key][1]) == 3
            if projector_type == "idefics3":
                n_layers = vc.num_hidden_layers
                assert fields["clip.vision.projector.scale_factor"] == (["UINT32"], config.scale_factor)
                assert fields["clip.vision.preproc_image_size"] == (["UINT32"], 64)  # size.longest_edge
                assert "clip.vision.feature_layer" not in fields
                scale2 = config.scale_factor ** 2
                projector = {"v.post_ln.weight": (vc.hidden_size,), "v.post_ln.bias": (vc.hidden_size,),
                             "mm.model.fc.weight": (hidden, vc.hidden_size * scale2)}
            else:
                n_layers = vc.num_hidden_layers - 1  # vision_feature_layer -2: the last layer is never run
                assert fields["clip.vision.feature_layer"] == (["ARRAY", "INT32"], [n_layers])
                projector = {"mm.0.weight": (hidden, vc.hidden_size), "mm.0.bias": (hidden,),
                             "mm.2.weight": (hidden, hidden), "mm.2.bias": (hidden,)}
            assert fields["clip.vision.block_count"] == (["UINT32"], n_layers)
            expected = expected_tensors(vc, n_layers, projector)
            assert {k: v[0] for k, v in tensors.items()} == expected
            matrix_type = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[precision]
            for tensor, (_, ggml_type) in tensors.items():
                is_matrix = len(expected[tensor]) == 2 and tensor.startswith(("v.blk.", "mm.")) and tensor.endswith(".weight")
                assert ggml_type == (matrix_type if is_matrix else "F32"), (name, precision, tensor)
            assert artifact.details["tested_with"].startswith("llama.cpp")


def _mtmd_prompt(session, image, question: str):
    """edgevlm's rendered prompt with mtmd's media marker where the image goes, plus edgevlm's own token ids."""
    from edgevlm.runtimes.prompt import prepare_image

    spec = session.spec
    text = session.render([session.user_message(question, 1)])
    prepared = prepare_image(spec, image, "probe")
    ids = session.tokenize(text, [prepared]).ids
    return text, ids


@pytest.mark.parametrize("name, size", [("idefics3", (64, 64)), ("idefics3", (100, 75)), ("llava-siglip", (32, 32))])
def test_libmtmd_encodes_like_pytorch(mmproj_bundles, name, size):
    """libmtmd itself loads the file, lays the prompt out as HF does (same ids, image chunks where edgevlm puts image
    rows) and encodes each tile like edgevlm's PyTorch encoder. idefics3 64x64 (= size.longest_edge: the slices are
    exact crops) and 100x75 (resampled twice: mtmd's port of Pillow's Lanczos gives PIL's pixels); LLaVA at the
    tower's size (mtmd pads other shapes to a square; see test_llava_non_square_differs)."""
    bundle = mmproj_bundles[name]
    manifest = Manifest.load(bundle)
    ckpt = source_checkpoint(manifest)
    session = edgevlm.load(bundle, encoder="onnx:fp32", decoder="gguf:f32")
    image = random_image(11, *size)
    text, ids = _mtmd_prompt(session, image, "What is in the picture?")
    gguf = bundle / manifest.find("decoder", "gguf:f32").path
    tiles = preprocess(image, manifest.preprocess).pixel_values  # (tiles, 3, H, W)
    with torch.inference_mode():
        reference = ckpt.vision(torch.from_numpy(tiles)).numpy()  # (tiles, T, D)
    for precision, min_cosine in (("f32", 0.999), ("f16", 0.999), ("q8_0", 0.99)):
        pipeline = MtmdPipeline(gguf, bundle / f"encoder/mmproj-{precision}.gguf", n_ctx=512, threads=2, parity=True)
        tokenized = pipeline.tokenize(text.replace(manifest.image_layout.placeholder, pipeline.marker),
                                      [np.asarray(image)])
        laid_out = []
        for chunk in tokenized.chunks:
            laid_out += list(chunk.token_ids) if chunk.kind == "text" else [manifest.image_layout.image_token_id] * chunk.n_tokens
        assert laid_out == ids.tolist(), precision
        embeddings, _ = pipeline.encode(tokenized)
        assert len(embeddings) == len(reference)
        for tile, (ours, ref) in enumerate(zip(embeddings, reference)):
            assert ours.shape == ref.shape
            assert cosine(ours, ref) >= min_cosine, (precision, tile, cosine(ours, ref))
        pipeline.free(tokenized)
        pipeline.close()


@pytest.mark.parametrize("name, size", [("idefics3", (64, 64)), ("llava-siglip", (32, 32))])
def test_mtmd_greedy_tokens_equal_edgevlm(mmproj_bundles, name, size):
    """llama.cpp's own multimodal path (mtmd tokenize, encode, its helpers decoding image chunks, its sampler) on the
    F32 mmproj + F32 decoder GGUF gives edgevlm's greedy tokens on the same GGUF (parity mode in both)."""
    bundle = mmproj_bundles[name]
    manifest = Manifest.load(bundle)
    session = edgevlm.load(bundle, encoder="onnx:fp32", decoder="gguf:f32", parity=True)
    image = random_image(12, *size)
    question = "Describe the image."
    ours = session.generate(image, question, max_tokens=TOKENS, stop_token_ids=[]).tokens
    text, _ = _mtmd_prompt(session, image, question)
    pipeline = MtmdPipeline(bundle / manifest.find("decoder", "gguf:f32").path, bundle / "encoder/mmproj-f32.gguf",
                            n_ctx=512, threads=2, parity=True)
    tokenized = pipeline.tokenize(text.replace(manifest.image_layout.placeholder, pipeline.marker), [np.asarray(image)])
    done = pipeline.prefill(tokenized)
    assert done["encoded_tiles"] == sum(c.kind == "image" for c in tokenized.chunks) and done["reused_positions"] == 0
    theirs, _ = pipeline.generate(TOKENS)
    assert theirs == ours
    # llama-server's prompt cache: a second question about the same image reuses the image chunks' KV
    other = pipeline.tokenize(_mtmd_prompt(session, image, "Which colours are there?")[0]
                              .replace(manifest.image_layout.placeholder, pipeline.marker), [np.asarray(image)])
    again = pipeline.prefill(other)
    assert again["encoded_tiles"] == 0 and again["reused_positions"] > 0
    warm, _ = pipeline.generate(TOKENS)
    pipeline.clear()
    pipeline.prefill(other)
    cold, _ = pipeline.generate(TOKENS)
    assert warm == cold
    pipeline.close()


def test_llava_non_square_differs(mmproj_bundles):
    """What the artifact's notes say: mtmd letterboxes a non-square image where the checkpoint's processor resizes
    it, so the two encoders see different pixels (measured: cosine 0.35 on a 50x70 image)."""
    bundle = mmproj_bundles["llava-siglip"]
    manifest = Manifest.load(bundle)
    assert any("pads non-square" in note for note in manifest.find("encoder", "mmproj:f32").details["notes"])
    session = edgevlm.load(bundle, encoder="onnx:fp32", decoder="gguf:f32")
    image = random_image(5, 50, 70)
    text, _ = _mtmd_prompt(session, image, "What?")
    pipeline = MtmdPipeline(bundle / manifest.find("decoder", "gguf:f32").path, bundle / "encoder/mmproj-f32.gguf",
                            n_ctx=512, threads=2, parity=True)
    embeddings, _ = pipeline.encode(pipeline.tokenize(text.replace("<image>", pipeline.marker), [np.asarray(image)]))
    ours = session.encoder.encode(preprocess(image, manifest.preprocess).pixel_values)  # (1, T, D)
    assert cosine(embeddings[0], ours[0]) < 0.9
    pipeline.close()


def test_edgevlm_refuses_to_run_an_mmproj(mmproj_bundles):
    with pytest.raises(BadInputError, match="llama.cpp's mmproj"):
        edgevlm.load(mmproj_bundles["idefics3"], encoder="mmproj:f16", decoder="gguf:f32")
    session = edgevlm.load(mmproj_bundles["idefics3"], decoder="gguf:f32")  # the default skips the mmproj
    assert session.encoder_name == "onnx:fp32"


def test_llava_clip_is_refused_before_anything_is_written(ckpts, tmp_path, capsys):
    out = tmp_path / "refused"
    code = main(["export", str(ckpts["llava-clip"]), "-o", str(out), "--encoder", "onnx:fp32,gguf:f16",
                 "--decoder", "gguf:f32"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "25814" in errors[0] and "CLIP" in errors[0], err
    assert not out.exists() and not list(tmp_path.glob(".refused*"))


def test_missing_separator_tokens_are_refused(ckpts):
    """mtmd inserts "\\n\\n" between the tiles and the global view by its piece: a vocabulary without it is refused."""
    from edgevlm.export.mmproj import IDEFICS3_PIECES, single_token_pieces
    from edgevlm.families import load_checkpoint
    from builders import CORPUS, _tokenizer, IDEFICS3_SPECIALS
    from edgevlm.reference.tokenizers import SMOLVLM_TEMPLATE

    assert single_token_pieces(load_checkpoint(ckpts["idefics3"]).tokenizer, IDEFICS3_PIECES) == []
    plain = _tokenizer(IDEFICS3_SPECIALS, SMOLVLM_TEMPLATE)  # trained without paragraphs
    assert single_token_pieces(plain, IDEFICS3_PIECES) == ["\n\n"]


def test_inspect_shows_the_llama_cpp_command(mmproj_bundles, capsys):
    assert main(["inspect", str(mmproj_bundles["idefics3"]), "--json"]) == 0
    usage = json.loads(capsys.readouterr().out)["llama_cpp"]
    assert "llama-mtmd-cli" in usage["cli"] and "--mmproj" in usage["cli"] and "mmproj-f16.gguf" in usage["cli"]
    assert "llama-server" in usage["server"] and "decoder/" in usage["server"]


def test_verify_runs_the_mmproj_through_libmtmd(mmproj_bundles):
    from edgevlm.verify import verify_bundle

    rows = {row["artifact"]: row for row in verify_bundle(mmproj_bundles["idefics3"], threads=2)}
    for precision, floor in (("f32", 0.999), ("f16", 0.999), ("q8_0", 0.99)):
        row = rows[f"mmproj:{precision}"]
        assert row["status"] == "pass" and row["cosine"] >= floor and "worst of 5 tiles" in row["criterion"], row


def test_bench_runs_llama_cpp_mtmd_as_a_peer(mmproj_bundles):
    """The in-process peer: llama.cpp's own multimodal path on the bundle's mmproj and decoder GGUF, in its own
    process, with the same image, questions and threads; its warm run reuses the image chunks' KV as llama-server
    does, and edgevlm's run gets its ratios against it."""
    from edgevlm.bench.harness import Scenario
    from edgevlm.bench.run import run_bench

    scenario = Scenario(image_size=(64, 64), prompt_tokens=8, new_tokens=4, repeats=1, threads=2)
    result = run_bench(mmproj_bundles["idefics3"], scenario, encoders="onnx:fp32", decoders="gguf:f32", peers="llamacpp")
    peer = next(p for p in result["peers"] if p.get("kind") == "llama.cpp mtmd")
    m = peer["metrics"]
    assert peer["encoder"] == "mmproj:f16" and peer["isolated"] is True
    assert (m["n_tiles"], m["n_image_tokens"]) == (5, 20)  # 2x2 slices + the overview, as edgevlm lays it out
    assert m["warm_encoded_tiles"] == 0 and m["warm_reused_positions"] > 20  # the image chunks' KV was kept
    assert 0 < m["ttft_warm_ms"]["median"] < m["ttft_cold_ms"]["median"] and m["decode_tok_s"]["median"] > 0
    assert m["peak_rss_mb"] > 0 and m["n_new_tokens"] == 4
    ratios = result["runs"][0]["vs_peers"][peer["name"]]
    assert set(ratios) == {"decode_tok_s", "ttft_cold", "ttft_warm", "peak_rss"}


def test_a_bundle_whose_only_encoder_is_an_mmproj_says_what_to_do(ckpts, tmp_path, capsys):
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint

    bundle = export_checkpoint(ckpts["idefics3"], tmp_path / "mmproj-only", [ArtifactRequest("mmproj", "f16")],
                               [ArtifactRequest("gguf", "q8_0")], max_tiles=4)
    image = tmp_path / "image.png"
    random_image(3, 40, 30).save(image)
    code = main(["run", str(bundle), "--image", str(image), "--prompt", "What?", "--max-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "mmproj:f16" in err and "onnx" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("label", ["attention layers 0 and 1 swapped", "projector weight x1.02"])
def test_damaged_mmprojs_fail_verify(label, mmproj_bundles, tmp_path):
    """The mmproj gates judge any weights (the reference model's CLIP tower has no mmproj): on the tiny Idefics3 files
    two tower layers' attention swapped FAIL F32 and F16 (max_rel_err 5.1e-3; Q8_0's own noise, 1e-2, hides it), and
    the projector 2% off (cosine cannot see that; the norm can) FAILs every precision."""
    import shutil

    import damage
    from edgevlm.verify import verify_report

    bundle = shutil.copytree(mmproj_bundles["idefics3"], tmp_path / "b")
    names = [f"mmproj:{p}" for p in ("f32", "f16", "q8_0")]
    for name in names:
        if label.startswith("attention"):
            damage.swap_gguf_layers(bundle, name, ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_out.weight"),
                                    prefix="v.blk")
        else:
            damage.scale_gguf_artifact(bundle, name, "mm.model.fc.weight", 1.02)
    rows = {r["artifact"]: r for r in verify_report(bundle, threads=2, decoders=False)["rows"]}
    failing = names if label.startswith("projector") else names[:2]
    assert {rows[n]["status"] for n in failing} == {"FAIL"}, {n: rows[n] for n in names}


@pytest.mark.parametrize("name", ["idefics3", "llava-siglip"])
def test_a_tower_whose_mlp_is_as_wide_as_the_tower_is_refused(ckpts, name):
    """clip.cpp's loader swaps ffn_up/ffn_down back when ffn_down is as wide as the tower (a legacy file, it assumes)
    for the mlp and idefics3 types too: such a tower is refused from config.json, before anything loads."""
    from edgevlm.families import describe, read_config
    from edgevlm.families.files import read_processor_config, read_vocabulary

    config = read_config(ckpts[name])
    assert describe(config, read_processor_config(ckpts[name]), read_vocabulary(ckpts[name])).mmproj_refusal is None
    vision = config["vision_config"]
    wide = {**config, "vision_config": {**vision, "intermediate_size": vision["hidden_size"]}}
    spec = describe(wide, read_processor_config(ckpts[name]), read_vocabulary(ckpts[name]))
    assert spec.mmproj_projector is None and "swapped" in spec.mmproj_refusal
