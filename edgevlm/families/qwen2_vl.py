"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`): a
native-resolution ViT (14-px patches, 2x2 merge; 2.5 adds window attention) whose image becomes h' x w' image tokens
(`<|image_pad|>` repeated, between the template's `<|vision_start|>` / `<|vision_end|>`), and a Qwen2 decoder with
M-RoPE positions (t, row, col). The vision side lives in qwen2_vl_vision.py."""
from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from ..layout import ImageLayout
from ..preprocess import PreprocessSpec
from . import base
from .qwen2_vl_vision import QwenVisionEncoder
from .qwen2_vl_vision import preprocess_spec as vision_preprocess_spec

ARCHITECTURES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
IMAGE_TOKEN = "<|image_pad|>"


def preprocess_spec(processor: dict, vision_config) -> PreprocessSpec:
    """Qwen2VLImageProcessor's saved settings (qwen2_vl_vision.preprocess_spec), checked against the tower."""
    spec = vision_preprocess_spec(processor)
    if spec.patch_size != vision_config.patch_size or spec.merge_size != vision_config.spatial_merge_size:
        raise CheckpointError(f"preprocessor_config.json says patch {spec.patch_size} / merge {spec.merge_size} but the "
                              f"vision tower uses {vision_config.patch_size} / {vision_config.spatial_merge_size}; the "
                              "files do not belong together")
    return spec


def load(path: Path, config_json: dict, dtype: str = "float32") -> base.LoadedCheckpoint:
    import transformers
    from transformers import AutoTokenizer

    weights = base.check_files(path)
    model_class = getattr(transformers, config_json["architectures"][0])
    hf_model = model_class.from_pretrained(path, dtype=base.torch_dtype(dtype)).eval()
    config = hf_model.config
    tokenizer = AutoTokenizer.from_pretrained(path)
    vocab = tokenizer.get_vocab()
    for token in (IMAGE_TOKEN, "<|vision_start|>", "<|vision_end|>"):
        if token not in vocab:
            raise CheckpointError(f"the tokenizer lacks {token!r}; re-save the checkpoint's tokenizer")
    if vocab[IMAGE_TOKEN] != int(config.image_token_id):
        raise CheckpointError(f"config.json's image_token_id {config.image_token_id} is not the tokenizer's "
                              f"{IMAGE_TOKEN} ({vocab[IMAGE_TOKEN]}); the files do not belong together")
    layout = ImageLayout("grid", IMAGE_TOKEN, IMAGE_TOKEN, int(config.image_token_id), 1)
    decoder = base.decoder_from(config.text_config, hf_model.model.language_model, hf_model.lm_head)
    return base.LoadedCheckpoint(
        family="qwen2_vl",
        path=path,
        hf_model=hf_model,
        vision=QwenVisionEncoder(hf_model).eval(),
        decoder=decoder,
        tokenizer=tokenizer,
        preprocess=preprocess_spec(base.read_processor_config(path), config.vision_config),
        layout=layout,
        chat_template=base.read_chat_template(path, tokenizer),
        stop_token_ids=base.stop_ids(path, config_json, tokenizer, ("<|im_end|>",)),
        context_length=int(config.text_config.max_position_embeddings),
        source_sha256=base.checkpoint_sha256(path, weights),
    )
