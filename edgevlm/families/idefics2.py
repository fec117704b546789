"""Idefics2 (Idefics2ForConditionalGeneration): SigLIP tower at variable resolution, a Perceiver-resampler bridge
(modality-projection MLP, then `resampler_n_latents` learned latents cross-attending to the patches: 64 rows per
image whatever its size), Mistral decoder (the llama row: llama.cpp converts Mistral as arch llama). Image splitting
(4 quarters + the whole) is optional. Tiles differ in size: preprocessing pads each onto a longest_edge square
canvas and passes HF's pixel mask as a 4th channel (preprocess.py). describe() is torch-free; load() builds the
PyTorch modules (idefics2_vision.Idefics2Vision)."""
from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from ..layout import ImageLayout
from ..preprocess import PreprocessSpec
from .files import resample_name
from .spec import PINNED_LLAMA_CPP, FamilySpec, Vocabulary, VisionShapes, decoder_row, tower_config, usable_context

ARCHITECTURES = ("Idefics2ForConditionalGeneration",)
END_OF_UTTERANCE = "<end_of_utterance>"
FAKE_TOKEN = "<fake_token_around_image>"
# transformers' Idefics2VisionConfig / Idefics2PerceiverConfig defaults, for keys a config.json may omit
TOWER_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=32)
N_LATENTS = 64
MMPROJ_REFUSAL = (f"{PINNED_LLAMA_CPP} has no Idefics2 projector type (clip-impl.h lists no perceiver resampler), so "
                  "no mmproj can be written; export --encoder onnx:... (its GGUF decoder runs in llama.cpp as usual)")


def preprocess_spec(processor: dict) -> PreprocessSpec:
    size = processor.get("size") or {"shortest_edge": 378, "longest_edge": 980}
    if not ("shortest_edge" in size and "longest_edge" in size):
        raise CheckpointError(f"Idefics2 preprocessing with size {size} is not supported (shortest_edge and "
                              "longest_edge, as the published checkpoints have)")
    if not processor.get("do_pad", True):
        raise CheckpointError("Idefics2 preprocessing without padding (do_pad=false) is not supported")
    longest = int(size["longest_edge"])
    return PreprocessSpec(
        "idefics2", (longest, longest),
        resample=resample_name(processor.get("resample", 2)),
        rescale_factor=float(processor.get("rescale_factor", 1 / 255)),
        image_mean=processor.get("image_mean", (0.5, 0.5, 0.5)),
        image_std=processor.get("image_std", (0.5, 0.5, 0.5)),
        shortest_edge=int(size["shortest_edge"]), longest_edge=longest,
        image_splitting=bool(processor.get("do_image_splitting", False)),
    )


def describe(config: dict, processor: dict, tokenizer: Vocabulary) -> FamilySpec:
    shape = tower_config(config, TOWER_DEFAULTS)
    image, patch = int(shape["image_size"]), int(shape["patch_size"])
    latents = int((config.get("perceiver_config") or {}).get("resampler_n_latents", N_LATENTS))
    tokens = int(processor.get("image_seq_len", latents))
    if tokens != latents:
        raise CheckpointError(f"the processor writes {tokens} image tokens per image but the perceiver makes "
                              f"{latents} latents; the checkpoint's files do not belong together")
    image_token_id = config.get("image_token_id") or tokenizer.id_of("<image>")
    if image_token_id is None:
        raise CheckpointError("neither config.json nor the tokenizer names the image token (<image>); re-save the "
                              "checkpoint")
    image_token = tokenizer.text_of(int(image_token_id)) or "<image>"
    preprocess = preprocess_spec(processor)
    side = preprocess.longest_edge // patch  # the canvas' patch grid: the tower's sequence per tile
    return FamilySpec(
        family="idefics2", architecture=ARCHITECTURES[0], preprocess=preprocess,
        layout=ImageLayout("idefics2", image_token, image_token, int(image_token_id), tokens, fake_token=FAKE_TOKEN),
        vision=VisionShapes.of_tower(shape, image, patch, side * side, tokens, ("connector.",)),
        decoder_architecture=decoder_row(config, "mistral"), mmproj_projector=None, mmproj_refusal=MMPROJ_REFUSAL,
        stop_tokens=(END_OF_UTTERANCE,),
    )


def load(path: Path, config_json: dict, dtype: str = "float32"):
    from transformers import AutoTokenizer, Idefics2ForConditionalGeneration

    from . import base
    from .idefics2_vision import Idefics2Vision

    weights = base.check_files(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    spec = describe(config_json, base.read_processor_config(path), Vocabulary.from_tokenizer(tokenizer))
    hf_model = Idefics2ForConditionalGeneration.from_pretrained(path, dtype=base.torch_dtype(dtype)).eval()
    text = hf_model.config.text_config
    context = usable_context(text.to_dict(), spec.decoder_architecture, text.max_position_embeddings)
    return base.loaded(spec, path, config_json, hf_model, tokenizer, weights, Idefics2Vision(hf_model).eval(),
                       base.decoder_from(text, hf_model.model.text_model, hf_model.lm_head), context_length=context)
