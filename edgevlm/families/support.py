"""What each family exports, in one table for `inspect --supported` and the README's family rows: the bridge between
the vision tower and the decoder, the decoder rows (decoder_arch.py) its checkpoints use, llama.cpp's projector type
for the mmproj, and what is refused with the reason. Torch-free; a test keeps it in step with FAMILIES and
decoder_arch's rows."""
from __future__ import annotations

from dataclasses import dataclass

from .spec import PINNED_LLAMA_CPP


@dataclass(frozen=True)
class FamilySupport:
    family: str
    models: str  # the published checkpoints it stands for
    bridge: str  # what turns tower features into decoder rows
    decoder_rows: tuple[str, ...]  # decoder_arch rows its decoders map to
    mmproj: str  # llama.cpp projector type(s) edgevlm writes, or "none: why"
    refused: str  # what is refused and why ("-" when nothing is)

    def __post_init__(self):
        if not (self.family and self.bridge and self.decoder_rows and self.mmproj and self.refused):
            raise ValueError(f"family support row {self.family!r} leaves a field empty")


SUPPORT = (
    FamilySupport("llava", "LLaVA-1.5 (CLIP), LLaVA with SigLIP / Qwen2 decoders", "MLP projector (2 layers, GELU)",
                  ("llama", "qwen2"), "mlp",
                  "pad-to-square preprocessing (do_pad=true); towers other than CLIP/SigLIP"),
    FamilySupport("idefics3", "SmolVLM, SmolVLM2 (images; SmolVLM2 video)", "pixel shuffle + linear", ("llama",),
                  "idefics3", "video for Idefics3 and SmolVLM-1"),
    FamilySupport("internvl", "InternVL3 -hf", "pixel shuffle + MLP", ("qwen2", "llama"), "internvl", "-"),
    FamilySupport("qwen2_vl", "Qwen2-VL, Qwen2.5-VL", "2x2 patch merger (MLP)", ("qwen2vl",),
                  "qwen2vl_merger, qwen2.5vl_merger",
                  "video on llama.cpp past one temporal patch (time-scaled M-RoPE t beyond where the text "
                  "resumes); TensorRT (native-resolution grid encoder)"),
    FamilySupport("qwen3_vl", "Qwen3-VL (dense)", "2x2 patch merger + DeepStack mergers", ("qwen3vl",),
                  "qwen3vl_merger",
                  "video (images only); DeepStack slices >= decoder layers (llama.cpp's graph asserts); TensorRT"),
    FamilySupport("gemma3", "Gemma 3 4B/12B/27B", "4x4 average pool + soft-embedding norm + linear", ("gemma3",),
                  "gemma3", "text-only Gemma 3 (1B: no vision tower)"),
    FamilySupport("idefics2", "Idefics2", "MLP + Perceiver resampler (64 latents)", ("llama",),
                  f"none: {PINNED_LLAMA_CPP} has no Idefics2 projector type",
                  "mmproj; preprocessing without padding or without shortest/longest edges"),
    FamilySupport("llava_onevision", "LLaVA-OneVision (-ov-hf)",
                  "2-layer MLP + anyres-max tiling (unpadding, pooling past the max, image_newline rows)", ("qwen2",),
                  f"none: {PINNED_LLAMA_CPP} has no LLaVA-OneVision projector type",
                  "mmproj; video"),
    FamilySupport("blip2", "BLIP-2 (OPT, Flan-T5), InstructBLIP (Vicuna)",
                  "Q-Former (32 queries; InstructBLIP's reads the instruction) + linear", ("llama",),
                  f"none: {PINNED_LLAMA_CPP} has no BLIP-2 projector type",
                  "GGUF/MLX decoders for OPT and Flan-T5 (llama.cpp and mlx-lm have no OPT and run no T5 "
                  "encoder-decoder as a VLM decoder: ONNX encoder + torch decoder)"),
    FamilySupport("paligemma", "PaliGemma 2", "linear projector; prefix-LM (image + prompt attend both ways)",
                  ("gemma2",), f"none: {PINNED_LLAMA_CPP} has no PaliGemma projector type",
                  "PaliGemma 1 (Gemma decoder); mmproj"),
)


def support_rows() -> dict[str, FamilySupport]:
    return {row.family: row for row in SUPPORT}
