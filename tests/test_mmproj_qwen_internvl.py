"""llama.cpp mmproj files for Qwen2-VL (`qwen2vl_merger`), Qwen2.5-VL (`qwen2.5vl_merger`) and InternVL (`internvl`),
checked through the real libmtmd: the file contract, mtmd laying the prompt out with HF's ids (image-token counts
equal the HF processors' for several sizes, non-square ones included) and encoding like edgevlm's PyTorch tower,
llama.cpp's own multimodal path giving edgevlm's greedy tokens on the same decoder GGUF, and what mtmd does
differently (the artifact notes), pinned so that an upstream change shows."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import random_image

import builders
import edgevlm
from edgevlm.bench.peers.mtmd import MtmdPipeline, image_token_bounds, media_prompt
from edgevlm.errors import BadInputError
from edgevlm.manifest import Manifest
from edgevlm.metrics import cosine
from edgevlm.preprocess import preprocess, tile_grid
from edgevlm.runtimes.bundle_loader import source_checkpoint

FAMILIES = ("qwen2", "qwen2.5", "internvl")
PROJECTORS = {"qwen2": "qwen2vl_merger", "qwen2.5": "qwen2.5vl_merger", "internvl": "internvl"}
TOKENS = 16


@pytest.fixture(scope="module")
def family_bundles(tmp_path_factory) -> dict:
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint

    root = tmp_path_factory.mktemp("mmproj-families")
    ckpts = {"qwen2": builders.build_qwen2_vl(root / "qwen2", "2", seed=11),
             "qwen2.5": builders.build_qwen25_vl_mtmd_windows(root / "qwen2.5", seed=11),
             "internvl": builders.build_internvl_unit_text(root / "internvl", seed=8)}
    encoders = [ArtifactRequest("onnx", "fp32")] + [ArtifactRequest("mmproj", p) for p in ("f32", "f16", "q8_0")]
    return {name: {"ckpt": path, "bundle": export_checkpoint(path, root / f"{name}-bundle", encoders,
                                                             [ArtifactRequest("gguf", "f32")], max_tiles=8)}
            for name, path in ckpts.items()}


def _pipeline(bundle, manifest, precision: str) -> MtmdPipeline:
    artifact = manifest.find("encoder", f"mmproj:{precision}")
    return MtmdPipeline(bundle / manifest.find("decoder", "gguf:f32").path, bundle / artifact.path, n_ctx=1024,
                        threads=2, parity=True, image_tokens=image_token_bounds(artifact.details))


def _mtmd_text(session, manifest, pipeline, question: str) -> str:
    text = session.render([session.user_message(question, 1)])
    kind = manifest.find("encoder", "mmproj:f32").details["projector_type"]
    return media_prompt(text, manifest.image_layout.placeholder, kind, pipeline.marker)


def _hf_image_tokens(family: str, ckpt_path, image) -> int:
    """The HF processor's image-token count for one image."""
    from transformers import AutoImageProcessor

    if family == "internvl":
        image_token = json.loads((ckpt_path / "config.json").read_text())["image_token_id"]
        ids = builders.internvl_processor(ckpt_path)(images=[image], text=["<IMG_CONTEXT>"], return_tensors="np")
        return int((ids["input_ids"] == image_token).sum())
    grid = AutoImageProcessor.from_pretrained(ckpt_path)(images=[image], return_tensors="pt")["image_grid_thw"][0]
    return int(grid.prod()) // 4  # one token per 2x2 merged patches


def _reference(ckpt, manifest, image) -> np.ndarray:
    """edgevlm's PyTorch tower on edgevlm's preprocessing: (tiles, T, D); a grid image is one (1, M, D) tile."""
    pre = preprocess(image, manifest.preprocess)
    with torch.inference_mode():
        pixels = torch.from_numpy(pre.pixel_values)
        return ckpt.vision(pixels).numpy() if pre.grid is None else ckpt.vision(pixels, pre.grid).numpy()[None]


def test_file_contract(family_bundles):
    """Keys at the types clip.cpp asserts and the tensors its loader looks up, per projector type."""
    from test_mmproj import read_gguf

    for family, projector in PROJECTORS.items():
        bundle = family_bundles[family]["bundle"]
        manifest = Manifest.load(bundle)
        artifact = manifest.find("encoder", "mmproj:f16")
        assert artifact.details["projector_type"] == projector
        fields, tensors = read_gguf(bundle / artifact.path)
        assert fields["clip.projector_type"] == (["STRING"], projector)
        assert fields["clip.has_vision_encoder"] == (["BOOL"], True)
        names = set(tensors)
        if family == "internvl":
            assert fields["clip.vision.projector.scale_factor"] == (["UINT32"], 2)
            assert fields["clip.vision.preproc_min_tiles"] == (["UINT32"], 1)
            assert fields["clip.vision.preproc_max_tiles"] == (["UINT32"], 6)  # the processor's max_patches
            assert fields["clip.use_gelu"] == (["BOOL"], True)
            assert {"v.class_embd", "v.patch_embd.bias", "v.blk.0.ls1.weight", "v.blk.1.ls2.weight",
                    "mm.model.mlp.0.weight", "mm.model.mlp.1.weight", "mm.model.mlp.3.bias"} <= names
            assert tensors["v.position_embd.weight"] == ((17, 32), "F32")  # 16 patches + the CLS row (last)
            assert "image_min_tokens" not in artifact.details
            continue
        assert fields["clip.vision.spatial_merge_size"] == (["UINT32"], 2)
        assert tensors["v.patch_embd.weight"][1] == tensors["v.patch_embd.weight.1"][1] == "F32"
        assert {"v.post_ln.weight", "mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias",
                "v.blk.1.attn_q.bias", "v.blk.1.attn_k.weight", "v.blk.1.attn_v.bias"} <= names
        assert tensors["mm.0.weight"][1] == "F16" and tensors["v.blk.0.ln1.weight"][1] == "F32"
        assert (artifact.details["image_min_tokens"], artifact.details["image_max_tokens"]) == (4, 64)
        if family == "qwen2.5":  # RMSNorm, SwiGLU, windows everywhere but block 1
            assert fields["clip.vision.n_wa_pattern"] == (["UINT32"], 2)
            assert fields["clip.use_silu"] == (["BOOL"], True)
            assert "v.blk.0.ffn_gate.weight" in names and "v.blk.0.ln1.bias" not in names
        else:  # LayerNorm, quick-GELU fc1/fc2: neither activation flag
            assert "clip.use_silu" not in fields and "clip.use_gelu" not in fields
            assert "v.blk.0.ln1.bias" in names and "v.blk.0.ffn_gate.weight" not in names


CASES = [("qwen2", (112, 56)), ("qwen2", (168, 224)), ("qwen2", (300, 200)), ("qwen2.5", (168, 224)),
         ("qwen2.5", (224, 112)), ("internvl", (32, 32)), ("internvl", (64, 32)), ("internvl", (32, 96)),
         ("internvl", (20, 20))]


@pytest.mark.parametrize("family, size", CASES)
def test_libmtmd_lays_out_and_encodes_like_pytorch(family, size, family_bundles):
    """libmtmd loads the file, lays the prompt out with HF's ids (its image-token count = the HF processor's) and
    encodes every image chunk like edgevlm's PyTorch tower. Qwen: multiples of 28 px (no resize), 300x200 (scaled
    into max_pixels with its aspect ratio kept: mtmd's Pillow port gives PIL's pixels), 2.5 across several 112-px
    windows; InternVL: one tile, 2x1 and 1x3 grids with the thumbnail, a 20x20 image scaled up."""
    bundle = family_bundles[family]["bundle"]
    manifest = Manifest.load(bundle)
    ckpt = source_checkpoint(manifest)
    session = edgevlm.load(bundle, encoder="onnx:fp32", decoder="gguf:f32")
    image = random_image(11, *size)
    ids = session.tokenize(session.render([session.user_message("What is in the picture?", 1)]),
                           [session._prepare_image(image)]).ids.tolist()
    image_token = manifest.image_layout.image_token_id
    assert ids.count(image_token) == _hf_image_tokens(family, family_bundles[family]["ckpt"], image)
    reference = _reference(ckpt, manifest, image)
    # worst tile over these cases: f32 0.9999999, f16 0.9999998, q8_0 0.99990 (InternVL) / 0.99993 (Qwen)
    for precision, floor in (("f32", 0.99999), ("f16", 0.999), ("q8_0", 0.99)):
        pipeline = _pipeline(bundle, manifest, precision)
        tokenized = pipeline.tokenize(_mtmd_text(session, manifest, pipeline, "What is in the picture?"),
                                      [np.asarray(image)])
        laid_out = []
        for chunk in tokenized.chunks:
            laid_out += list(chunk.token_ids) if chunk.kind == "text" else [image_token] * chunk.n_tokens
        assert laid_out == ids, precision
        embeddings, _ = pipeline.encode(tokenized)
        assert [e.shape for e in embeddings] == [r.shape for r in reference]
        for tile, (ours, ref) in enumerate(zip(embeddings, reference)):
            assert cosine(ours, ref) >= floor, (precision, tile, cosine(ours, ref))
        pipeline.free(tokenized)
        pipeline.close()


@pytest.mark.parametrize("family, size", [("qwen2", (168, 112)), ("qwen2.5", (224, 168)), ("internvl", (64, 32))])
def test_mtmd_greedy_tokens_equal_edgevlm(family, size, family_bundles):
    """llama.cpp's own multimodal path (mtmd's tokenizer, encoder and image-chunk decoding with its M-RoPE positions,
    llama.cpp's sampler) on the F32 mmproj + F32 decoder GGUF gives edgevlm's greedy tokens on the same GGUF."""
    bundle = family_bundles[family]["bundle"]
    manifest = Manifest.load(bundle)
    session = edgevlm.load(bundle, encoder="onnx:fp32", decoder="gguf:f32", parity=True)
    image = random_image(12, *size)
    question = "Describe the image."
    ours = session.generate(image, question, max_tokens=TOKENS, stop_token_ids=[]).tokens
    pipeline = _pipeline(bundle, manifest, "f32")
    tokenized = pipeline.tokenize(_mtmd_text(session, manifest, pipeline, question), [np.asarray(image)])
    done = pipeline.prefill(tokenized)
    assert done["encoded_tiles"] == sum(c.kind == "image" for c in tokenized.chunks) > 0
    theirs, _ = pipeline.generate(TOKENS)
    assert theirs == ours
    # the tokens depend on the image: another one changes them (else this comparison would not see the image path)
    other = pipeline.tokenize(_mtmd_text(session, manifest, pipeline, question), [np.asarray(random_image(13, *size))])
    pipeline.clear()
    pipeline.prefill(other)
    assert pipeline.generate(TOKENS)[0] != ours
    pipeline.close()


@pytest.mark.parametrize("family, size", [("qwen2", (100, 40)), ("qwen2", (70, 112)), ("internvl", (50, 30))])
def test_what_mtmd_does_differently_is_in_the_notes(family, size, family_bundles):
    """The artifact notes, measured: mtmd letterboxes a Qwen image whose aspect ratio smart-resize changes (100x40 ->
    112x28: same token count, other pixels, cosine 0.02 here) where HF stretches it; a 70-px side is 2.5 x 28: HF
    rounds it to 2 merged tokens, mtmd to 3; mtmd tiles a 50x30 image for InternVL by best fit (2x1 + thumbnail:
    3 tiles) where InternVL takes the closest aspect ratio (3x2 + thumbnail)."""
    bundle = family_bundles[family]["bundle"]
    manifest = Manifest.load(bundle)
    notes = " ".join(manifest.find("encoder", "mmproj:f32").details["notes"])
    session = edgevlm.load(bundle, encoder="onnx:fp32", decoder="gguf:f32")
    image = random_image(5, *size)
    pipeline = _pipeline(bundle, manifest, "f32")
    tokenized = pipeline.tokenize(_mtmd_text(session, manifest, pipeline, "What?"), [np.asarray(image)])
    embeddings, _ = pipeline.encode(tokenized)
    reference = _reference(source_checkpoint(manifest), manifest, image)
    if size == (70, 112):
        assert "rounds a side" in notes
        assert (len(embeddings[0]), len(reference[0])) == (3 * 4, 2 * 4)
    elif family == "qwen2":
        assert "pads with black" in notes
        assert embeddings[0].shape == reference[0].shape and cosine(embeddings[0], reference[0]) < 0.5
    else:
        assert "closest aspect ratio" in notes
        assert (len(embeddings), len(reference)) == (3, 7)
    pipeline.close()


def test_inspect_passes_the_processor_token_bounds(family_bundles, capsys):
    from edgevlm.cli import main

    assert main(["inspect", str(family_bundles["qwen2"]["bundle"]), "--json"]) == 0
    usage = json.loads(capsys.readouterr().out)["llama_cpp"]
    for command in (usage["cli"], usage["server"]):
        assert "--image-min-tokens 4 --image-max-tokens 64" in command


def test_verify_runs_the_new_mmprojs_through_libmtmd(family_bundles):
    from edgevlm.verify import verify_bundle

    for family in ("qwen2.5", "internvl"):
        rows = {row["artifact"]: row for row in verify_bundle(family_bundles[family]["bundle"], threads=2)}
        for precision, floor in (("f32", 0.999), ("f16", 0.999), ("q8_0", 0.99)):
            row = rows[f"mmproj:{precision}"]
            assert row["status"] == "pass" and row["cosine"] >= floor, (family, row)


def test_checkpoints_mtmd_cannot_run_are_refused_by_their_description():
    """From config.json alone (families' describe(), before anything loads): Qwen2.5-VL windows other than 112 px,
    full-attention blocks that are not every n-th, an MLP as wide as the tower (clip.cpp's loader would swap its up
    and down matrices as a legacy file's); InternVL q/k norms, a tower-final LayerNorm, the CLS kept."""
    from edgevlm.families import internvl, qwen2_vl

    base = {**qwen2_vl.TOWER_DEFAULTS, "hidden_size": 1280, "intermediate_size": 3420, "depth": 32}
    assert qwen2_vl.window_pattern([7, 15, 23, 31], 32) == 8 and qwen2_vl.window_pattern([7, 15, 31], 32) is None
    assert qwen2_vl.mmproj_refusal(base, True, 1280, 3420) is None
    for change, match in (({"window_size": 56}, "112-px"), ({"fullatt_block_indexes": [7, 15, 31]}, "every n-th"),
                          ({"spatial_merge_size": 4}, "2x2 merge")):
        assert match in qwen2_vl.mmproj_refusal({**base, **change}, True, 1280, 3420)
    assert "swapped" in qwen2_vl.mmproj_refusal(base, True, 1280, 1280)
    shape = dict(internvl.TOWER_DEFAULTS)
    assert internvl.mmproj_refusal({}, shape) is None
    for config, change, match in (({}, {"use_qk_norm": True}, "q and k"), ({}, {"use_mean_pooling": False}, "LayerNorm"),
                                  ({"vision_feature_select_strategy": "full"}, {}, "CLS"),
                                  ({}, {"norm_type": "rms_norm"}, "norm"), ({"vision_feature_layer": 0}, {}, "layer")):
        assert match in internvl.mmproj_refusal(config, {**shape, **change})


def test_internvl_positions_are_stored_cls_last(family_bundles, tmp_path):
    """clip.cpp's internvl graph appends the CLS token after the patches and adds position rows in that order (the
    CLS-last layout of upstream issue 25814), so the file stores HF's rows CLS-last. Written in HF's order (what
    llama.cpp's own converter does) every patch gets its neighbour's position: cosine -0.05 here."""
    from edgevlm.export.mmproj import plan_mmproj, write_mmproj

    bundle = family_bundles["internvl"]["bundle"]
    manifest = Manifest.load(bundle)
    ckpt = source_checkpoint(manifest)
    plan = plan_mmproj(ckpt)
    rows = plan.tensors["v.position_embd.weight"]
    plan.tensors["v.position_embd.weight"] = np.concatenate([rows[-1:], rows[:-1]])  # back to HF's CLS-first order
    write_mmproj(plan, tmp_path / "cls-first.gguf", "f32")
    image = random_image(11, 32, 32)
    reference = _reference(ckpt, manifest, image)
    cosines = {}
    for name, path in (("cls-last", bundle / "encoder/mmproj-f32.gguf"), ("cls-first", tmp_path / "cls-first.gguf")):
        pipeline = MtmdPipeline(bundle / manifest.find("decoder", "gguf:f32").path, path, n_ctx=512, threads=2,
                                parity=True)
        embeddings, _ = pipeline.encode(pipeline.tokenize(pipeline.marker, [np.asarray(image)]))
        cosines[name] = cosine(embeddings[0], reference[0])
        pipeline.close()
    assert cosines["cls-last"] >= 0.999 and cosines["cls-first"] < 0.5, cosines


def test_bench_runs_mtmd_on_a_qwen_bundle(family_bundles):
    """The bench's llama.cpp peer on a Qwen2-VL bundle: the processor's token bounds and the prompt without a second
    pair of vision delimiters, so mtmd's image has edgevlm's token count and its warm run reuses the image's KV."""
    from edgevlm.bench.harness import Scenario
    from edgevlm.bench.run import run_bench

    bundle = family_bundles["qwen2"]["bundle"]
    scenario = Scenario(image_size=(168, 112), prompt_tokens=8, new_tokens=4, repeats=1, threads=2)
    result = run_bench(bundle, scenario, encoders="onnx:fp32", decoders="gguf:f32", peers="llamacpp")
    peer = next(p for p in result["peers"] if p.get("kind") == "llama.cpp mtmd")
    metrics = peer["metrics"]
    rows, cols = tile_grid(112, 168, Manifest.load(bundle).preprocess)  # merged-token rows x cols
    assert metrics["n_image_tokens"] == rows * cols == 24
    assert metrics["warm_encoded_tiles"] == 0 and metrics["warm_reused_positions"] > 24
