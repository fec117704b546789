"""Idefics3 / SmolVLM / SmolVLM2: SigLIP, pixel-shuffle connector, image splitting into tiles + a global view, Llama
decoder. SmolVLM2 (`SmolVLMForConditionalGeneration`) subclasses Idefics3 with the same submodules, processor rule
and prompt layout (transformers' processing_smolvlm builds the same strings as Idefics3's); it is loaded with its own
class. Video input is not exported."""
from __future__ import annotations

from pathlib import Path

import torch

from ..layout import ImageLayout
from ..preprocess import PreprocessSpec
from . import base

ARCHITECTURES = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
END_OF_UTTERANCE = "<end_of_utterance>"


class Idefics3Vision(torch.nn.Module):
    """Full tiles only (the processor always makes full tiles for single images), so position ids are static;
    this keeps the graph free of the variable-resolution code that the TorchScript ONNX exporter mis-traces."""

    def __init__(self, hf_model):
        super().__init__()
        vision_model = hf_model.model.vision_model
        self.patch_embedding = vision_model.embeddings.patch_embedding
        self.position_embedding = vision_model.embeddings.position_embedding
        self.encoder = vision_model.encoder
        self.post_layernorm = vision_model.post_layernorm
        self.connector = hf_model.model.connector
        n_patches = vision_model.embeddings.num_patches
        self.register_buffer("position_ids", torch.arange(n_patches), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (tiles, P, Dv)
        hidden = patches + self.position_embedding(self.position_ids)[None]  # (tiles, P, Dv)
        hidden = self.encoder(inputs_embeds=hidden).last_hidden_state
        return self.connector(self.post_layernorm(hidden))  # (tiles, P / scale^2, D)


def preprocess_spec(processor: dict, vision_config) -> PreprocessSpec:
    tile = int(processor.get("max_image_size", {}).get("longest_edge", vision_config.image_size))
    return PreprocessSpec(
        "idefics3",
        (tile, tile),
        resample=base.resample_name(processor.get("resample", 1)),
        rescale_factor=float(processor.get("rescale_factor", 1 / 255)),
        image_mean=processor.get("image_mean", (0.5, 0.5, 0.5)),
        image_std=processor.get("image_std", (0.5, 0.5, 0.5)),
        longest_edge=int(processor.get("size", {}).get("longest_edge", 4 * tile)),
        image_splitting=bool(processor.get("do_image_splitting", True)),
    )


def load(path: Path, config_json: dict, dtype: str = "float32") -> base.LoadedCheckpoint:
    import transformers
    from transformers import AutoTokenizer

    weights = base.check_files(path)
    # the class the config names: loading SmolVLM2 as Idefics3 works but warns about the model type
    class_name = next(a for a in config_json.get("architectures", []) if a in ARCHITECTURES)
    hf_model = getattr(transformers, class_name).from_pretrained(path, dtype=base.torch_dtype(dtype)).eval()
    config = hf_model.config
    vision_config = config.vision_config
    tokenizer = AutoTokenizer.from_pretrained(path)
    processor = base.read_processor_config(path)
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    image_seq_len = int(processor.get("image_seq_len", patches // config.scale_factor**2))
    image_token_id = int(getattr(config, "image_token_id", None) or tokenizer.convert_tokens_to_ids("<image>"))
    image_token = tokenizer.convert_ids_to_tokens(image_token_id)
    layout = ImageLayout(
        "idefics3", image_token, image_token, image_token_id, image_seq_len,
        fake_token="<fake_token_around_image>", global_token="<global-img>", row_col_format="<row_{row}_col_{col}>",
    )
    decoder = base.decoder_from(config.text_config, hf_model.model.text_model, hf_model.lm_head)
    return base.LoadedCheckpoint(
        family="idefics3",
        path=path,
        hf_model=hf_model,
        vision=Idefics3Vision(hf_model).eval(),
        decoder=decoder,
        tokenizer=tokenizer,
        preprocess=preprocess_spec(processor, vision_config),
        layout=layout,
        chat_template=base.read_chat_template(path, tokenizer),
        stop_token_ids=base.stop_ids(path, config_json, tokenizer, (END_OF_UTTERANCE,)),
        context_length=int(config.text_config.max_position_embeddings),
        source_sha256=base.checkpoint_sha256(path, weights),
    )
