"""PaliGemma (PaliGemmaForConditionalGeneration; PaliGemma 2 = a Gemma 2 decoder): SigLIP tower at one fixed size,
its last hidden state through a linear projector, one image token per patch (448 px / 14 = 32 x 32 = 1024). The
prompt is PaliGemmaProcessor's: the image tokens, then `<bos>` + prompt + "\\n" (bos after the last image; no bos
before the images). The decoder is a prefix-LM (image_attention "prefix"): the image rows *and* the prompt attend to
each other bidirectionally, only the answer is causal (HF: token_type_ids 0 for the prefix). llama.cpp has no
PaliGemma projector, so no mmproj is written; its gemma2 architecture runs the decoder through edgevlm's runtime.
describe() is torch-free; load() builds the PyTorch modules (the tower -> projector split of gemma3_vision)."""
from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from ..layout import ImageLayout
from ..preprocess import PreprocessSpec
from .files import resample_name, square_side
from .spec import PINNED_LLAMA_CPP, FamilySpec, Vocabulary, VisionShapes, decoder_row, tower_config

ARCHITECTURES = ("PaliGemmaForConditionalGeneration",)
# transformers' SiglipVisionConfig defaults as PaliGemmaConfig builds it (So400m/14 at 224), for omitted keys
TOWER_DEFAULTS = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                      image_size=224, patch_size=14)
IMAGE, BOS = "<image>", "<bos>"
MMPROJ_REFUSAL = (f"{PINNED_LLAMA_CPP} has no PaliGemma projector (tools/mtmd/clip-impl.h; its PaliGemma PR was "
                  "closed): use the ONNX encoder; the GGUF decoder runs through edgevlm's runtime")


def preprocess_spec(processor: dict, image_size: int) -> PreprocessSpec:
    """SiglipImageProcessor: resize to the tower's square (bicubic), rescale, normalise to [-1, 1]; no tiles."""
    size = processor.get("size") or image_size
    side = square_side(size if not isinstance(size, dict) else (size.get("height") or image_size))
    return PreprocessSpec(
        "fixed", (side, side),
        resample=resample_name(processor.get("resample", 3)),
        rescale_factor=float(processor.get("rescale_factor", 1 / 255)),
        image_mean=processor.get("image_mean", (0.5, 0.5, 0.5)),
        image_std=processor.get("image_std", (0.5, 0.5, 0.5)),
    )


def describe(config: dict, processor: dict, tokenizer: Vocabulary) -> FamilySpec:
    shape = tower_config(config, TOWER_DEFAULTS)
    image, patch = square_side(shape["image_size"]), square_side(shape["patch_size"])
    tokens = (image // patch) ** 2  # one row per patch: no pooling to mm_tokens_per_image, unlike Gemma 3's describe
    seq_len = int(processor.get("image_seq_length", tokens))
    if seq_len != tokens:
        raise CheckpointError(f"the processor says {seq_len} tokens per image but the {image}px tower with "
                              f"{patch}px patches makes {tokens}; the checkpoint's files do not belong together")
    image_token_id = int(config.get("image_token_index", config.get("image_token_id", 257_152)))
    image_token = tokenizer.text_of(image_token_id) or IMAGE
    text = config.get("text_config") or {}
    if text.get("model_type", "gemma2") == "gemma":
        raise CheckpointError("PaliGemma 1 (a Gemma 1 decoder) is not exported: edgevlm has a gemma2 decoder row "
                              "(PaliGemma 2); use a PaliGemma 2 checkpoint")
    if tokenizer.known and tokenizer.id_of(BOS) is None:
        raise CheckpointError(f"the tokenizer lacks {BOS}, which PaliGemma's prompt puts after the image")
    return FamilySpec(
        family="paligemma", architecture=ARCHITECTURES[0], preprocess=preprocess_spec(processor, image),
        layout=ImageLayout("paligemma", IMAGE, image_token, image_token_id, tokens, start_token=BOS),
        vision=VisionShapes.of_tower(shape, image, patch, tokens, tokens, ("multi_modal_projector.",)),
        decoder_architecture=decoder_row(config, "gemma2"), mmproj_projector=None, mmproj_refusal=MMPROJ_REFUSAL,
        stop_tokens=("<eos>",), image_attention="prefix",
    )


def load(path: Path, config_json: dict, dtype: str = "float32"):
    from transformers import PaliGemmaForConditionalGeneration

    from .gemma3_vision import load_siglip_gemma

    return load_siglip_gemma(path, config_json, dtype, PaliGemmaForConditionalGeneration, describe, causal_decoder=True)
