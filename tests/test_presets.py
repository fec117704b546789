"""Architecture presets: exact public shapes, loadable by transformers, special tokens at their real ids."""
from __future__ import annotations

import json

import pytest

from edgevlm.cli import main
from edgevlm.reference.presets import PRESETS, SMOLVLM_SPECIAL_IDS


@pytest.fixture(scope="module")
def smolvlm_256m(tmp_path_factory):
    out = tmp_path_factory.mktemp("preset") / "smolvlm-256m"
    assert main(["preset", "smolvlm-256m", "-o", str(out)]) == 0
    return out


def test_smolvlm_256m_shapes_in_transformers(smolvlm_256m):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(smolvlm_256m)
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.intermediate_size,
            vision.patch_size, vision.image_size) == (768, 12, 12, 3072, 16, 512)
    assert config.scale_factor == 4
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size) == (576, 30, 9, 3, 1536, 49280)
    assert text.rope_parameters["rope_theta"] == 100000
    tokenizer = AutoTokenizer.from_pretrained(smolvlm_256m)
    assert len(tokenizer) == 49280
    for token_id, token in SMOLVLM_SPECIAL_IDS.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id
    # as in SmolVLM's real vocabulary: llama.cpp's mtmd inserts these by their piece (else no mmproj can be exported)
    from edgevlm.export.mmproj import IDEFICS3_PIECES, single_token_pieces

    assert single_token_pieces(tokenizer, IDEFICS3_PIECES) == []


def test_smolvlm_256m_inspect_reports_228m(smolvlm_256m, capsys):
    assert main(["inspect", str(smolvlm_256m), "--json"]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["family"] == "idefics3"
    assert 227e6 <= data["parameters"]["total"] <= 229e6
    assert data["image_layout"]["tokens_per_tile"] == 64
    assert data["decoder"]["tie_word_embeddings"] is True


def test_smolvlm_500m_public_dims():
    shape = PRESETS["smolvlm-500m"]
    assert (shape.text_hidden, shape.text_layers, shape.text_heads, shape.text_kv_heads, shape.text_mlp) == (960, 32, 15, 5, 2560)
    assert (shape.vision_hidden, shape.vision_layers, shape.image, shape.patch, shape.scale_factor) == (768, 12, 512, 16, 4)


def test_preset_refuses_to_overwrite(smolvlm_256m, capsys):
    assert main(["preset", "smolvlm-256m", "-o", str(smolvlm_256m)]) == 2
    assert "--force" in capsys.readouterr().err


def test_new_presets_public_dims():
    """SmolVLM2 and InternVL3 presets: the published shapes (81 tokens per 384-px tile at scale 3 for 2.2B; 256 per
    448-px tile at shuffle 0.5 for InternVL3), the class each is saved as, untied heads like the public models."""
    from edgevlm.reference.presets import InternVLShape, LlavaShape

    big = PRESETS["smolvlm2-2.2b"]
    assert (big.text_hidden, big.text_layers, big.text_mlp, big.context) == (2048, 24, 8192, 8192)
    assert (big.image // big.patch) ** 2 // big.scale_factor**2 == 81 and big.architecture == "smolvlm"
    assert PRESETS["smolvlm2-256m"].architecture == "smolvlm" and not PRESETS["smolvlm2-256m"].tied
    internvl = PRESETS["internvl3-1b"]
    assert isinstance(internvl, InternVLShape) and (internvl.image // internvl.patch) ** 2 // 4 == 256
    assert (internvl.text_hidden, internvl.text_layers, internvl.text_heads, internvl.text_kv_heads,
            internvl.vocab) == (896, 24, 14, 2, 151674)
    assert isinstance(PRESETS["llava-1.5-7b"], LlavaShape) and PRESETS["llava-1.5-7b"].text_mlp == 11008


def test_gemma3_preset_projector_is_not_zero(tmp_path):
    """transformers initialises Gemma 3's projector to zero; the preset randomises it, or every image embeds to zeros
    (found exporting gemma3-4b for W4: the checkpoint's projector read all zeros, so the int8 encoder's cosine to
    fp32 is 0, below the ladder, and export refuses it)."""
    from safetensors import safe_open

    from edgevlm.reference.preset_gemma3 import Gemma3Shape, build_gemma3
    from edgevlm.reference.presets import _CORPUS

    tiny = Gemma3Shape(text_hidden=32, text_layers=1, text_heads=2, text_kv_heads=1, text_mlp=64, head_dim=16,
                       vision_hidden=32, vision_layers=1, vision_heads=2, vision_mlp=64, image=56, tokens_per_image=4)
    out = build_gemma3(tiny, tmp_path / "gemma3", _CORPUS[:8])
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        weight = f.get_tensor("multi_modal_projector.mm_input_projection_weight")
    assert weight.shape == (32, 32) and weight.abs().max() > 0


def test_smolvlm2_presets_carry_the_video_sampling(tmp_path):
    """SmolVLM2 checkpoints take video: the preset writes SmolVLMVideoProcessor's sampling (1 fps, at most 64 frames)
    where the Hub's checkpoints keep it, and the loader reads it (the image `size` is the first resize, as in
    transformers). A tiny SmolVLM2-shaped model; SmolVLM (Idefics3) presets stay image-only."""
    from dataclasses import replace

    from edgevlm.families import load_checkpoint
    from edgevlm.reference.presets import _build_smolvlm

    tiny = replace(PRESETS["smolvlm2-256m"], text_hidden=64, text_layers=2, text_heads=2, text_kv_heads=1,
                   text_mlp=128, vision_hidden=32, vision_layers=1, vision_heads=2, vision_mlp=64, image=64)
    video = load_checkpoint(_build_smolvlm(tiny, tmp_path / "smolvlm2", single_tile=False)).spec.video
    assert (video.kind, video.fps, video.max_frames, video.video_longest_edge, video.frame_size) == \
        ("smolvlm", 1.0, 64, 4 * 64, 64)
    idefics3 = replace(tiny, architecture=PRESETS["smolvlm-256m"].architecture)
    assert load_checkpoint(_build_smolvlm(idefics3, tmp_path / "smolvlm", single_tile=False)).spec.video is None


def test_instructblip_preset_features_depend_on_the_image(tmp_path):
    """transformers starts InstructBLIP's query tokens at zero and its ViT at std 1e-10, so the preset's Q-Former
    output did not depend on the image (the int8 encoder's cosine to fp32 then measures nothing on the 7B bench): the
    preset randomises both. Two different images must give different projected features (5e-8 apart before the fix,
    ~1e-2 after: at random init the learned queries dominate the Q-Former's output; the image still moves it)."""
    import torch
    from transformers import InstructBlipForConditionalGeneration

    from edgevlm.reference.preset_instructblip import InstructBlipShape, build_instructblip
    from edgevlm.reference.presets import _CORPUS

    tiny = InstructBlipShape(text_hidden=32, text_layers=1, text_heads=2, text_kv_heads=2, text_mlp=64,
                             vision_hidden=32, vision_layers=2, vision_heads=2, vision_mlp=64, image=28, queries=4,
                             qformer_hidden=32, qformer_layers=2, qformer_heads=2, qformer_mlp=64, qformer_positions=64)
    torch.manual_seed(0)
    out = build_instructblip(tiny, tmp_path / "instructblip", _CORPUS[:8])
    model = InstructBlipForConditionalGeneration.from_pretrained(out).eval()
    assert model.query_tokens.abs().max() > 0
    pixels = torch.stack([torch.zeros(3, 28, 28), torch.linspace(-2, 2, 3 * 28 * 28).reshape(3, 28, 28)])  # (2, 3, H, W)
    ids = torch.ones(2, 3, dtype=torch.long)
    with torch.no_grad():
        vision = model.vision_model(pixel_values=pixels).last_hidden_state  # (2, 1 + 4, 32)
        query = model.qformer(input_ids=ids, attention_mask=torch.ones_like(ids),
                              query_embeds=model.query_tokens.expand(2, -1, -1),
                              encoder_hidden_states=vision).last_hidden_state[:, : tiny.queries]  # (2, 4, 32)
        features = model.language_projection(query)  # (2, 4, 32)
    gap = (features[0] - features[1]).norm() / features[0].norm()
    assert gap > 1e-3, f"the two images' features are {gap:.2e} apart (relative): the image does not reach the bridge"
