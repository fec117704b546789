"""Idefics3 / SmolVLM / SmolVLM2: SigLIP, pixel-shuffle connector, image splitting into tiles + a global view, Llama
decoder. SmolVLM2 (`SmolVLMForConditionalGeneration`) subclasses Idefics3 with the same submodules, processor rule
and prompt layout (transformers' processing_smolvlm builds the same strings as Idefics3's); it is loaded with its own
class. SmolVLM2's video input: edgevlm.video.smolvlm. describe() is torch-free; load() builds the PyTorch modules
(towers.Idefics3Vision)."""
from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from ..layout import ImageLayout
from ..preprocess import PreprocessSpec
from .files import resample_name
from .spec import FamilySpec, Vocabulary, VisionShapes, decoder_row, mlp_width_refusal, tower_config

ARCHITECTURES = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
END_OF_UTTERANCE = "<end_of_utterance>"
# transformers' Idefics3VisionConfig / SmolVLMVisionConfig defaults, for keys a config.json may omit
TOWER_DEFAULTS = dict(hidden_size=1152, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16,
                      image_size=224, patch_size=32)
MTMD_SCALES = (2, 4)  # the pixel-shuffle scales clip.cpp's idefics3 graph takes


def preprocess_spec(processor: dict, image_size: int) -> PreprocessSpec:
    tile = int(processor.get("max_image_size", {}).get("longest_edge", image_size))
    return PreprocessSpec(
        "idefics3",
        (tile, tile),
        resample=resample_name(processor.get("resample", 1)),
        rescale_factor=float(processor.get("rescale_factor", 1 / 255)),
        image_mean=processor.get("image_mean", (0.5, 0.5, 0.5)),
        image_std=processor.get("image_std", (0.5, 0.5, 0.5)),
        longest_edge=int(processor.get("size", {}).get("longest_edge", 4 * tile)),
        image_splitting=bool(processor.get("do_image_splitting", True)),
    )


def describe(config: dict, processor: dict, tokenizer: Vocabulary) -> FamilySpec:
    architecture = next((a for a in config.get("architectures") or [] if a in ARCHITECTURES), ARCHITECTURES[0])
    shape = tower_config(config, TOWER_DEFAULTS)
    image, patch = int(shape["image_size"]), int(shape["patch_size"])
    scale = int(config.get("scale_factor", 2))
    patches = (image // patch) ** 2
    tokens = int(processor.get("image_seq_len", patches // scale**2))
    image_token_id = config.get("image_token_id") or tokenizer.id_of("<image>")
    if image_token_id is None:
        raise CheckpointError("neither config.json nor the tokenizer names the image token (<image>); re-save the "
                          "checkpoint")
    image_token = tokenizer.text_of(int(image_token_id)) or "<image>"
    layout = ImageLayout(
        "idefics3", image_token, image_token, int(image_token_id), tokens,
        fake_token="<fake_token_around_image>", global_token="<global-img>", row_col_format="<row_{row}_col_{col}>",
    )
    refusal = None if scale in MTMD_SCALES else \
        f"clip.cpp's idefics3 graph takes a pixel-shuffle scale of 2 or 4, this checkpoint has {scale}"
    refusal = refusal or mlp_width_refusal("idefics3", int(shape["hidden_size"]), int(shape["intermediate_size"]))
    return FamilySpec(
        family="idefics3", architecture=architecture, preprocess=preprocess_spec(processor, image), layout=layout,
        vision=VisionShapes.of_tower(shape, image, patch, patches, tokens, ("connector.",)),
        decoder_architecture=decoder_row(config), mmproj_projector=None if refusal else "idefics3",
        mmproj_refusal=refusal, stop_tokens=(END_OF_UTTERANCE,), video=video_spec(architecture, processor),
    )


def video_spec(architecture: str, processor: dict):
    """SmolVLM2 reads video (frames as unsplit tiles with timestamps); Idefics3 and SmolVLM-1 do not."""
    if architecture != "SmolVLMForConditionalGeneration":
        return None
    from ..video.smolvlm import SmolVLMVideoSpec

    try:
        return SmolVLMVideoSpec.from_processor(processor, processor.get("video_processor"))
    except (TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"the video processor settings are unusable ({exc}); re-save the checkpoint") from None


def load(path: Path, config_json: dict, dtype: str = "float32"):
    import transformers
    from transformers import AutoTokenizer

    from . import base
    from .towers import Idefics3Vision

    weights = base.check_files(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    spec = describe(config_json, base.read_processor_config(path), Vocabulary.from_tokenizer(tokenizer))
    # the class the config names: loading SmolVLM2 as Idefics3 works but warns about the model type
    hf_model = getattr(transformers, spec.architecture).from_pretrained(path, dtype=base.torch_dtype(dtype)).eval()
    config = hf_model.config
    decoder = base.decoder_from(config.text_config, hf_model.model.text_model, hf_model.lm_head)
    return base.loaded(spec, path, config_json, hf_model, tokenizer, weights, Idefics3Vision(hf_model).eval(), decoder)
