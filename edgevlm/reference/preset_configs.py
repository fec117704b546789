"""What a preset's checkpoint files would say, without writing them (and without torch): config.json, the processor
config and the token table that build_preset saves, as the families' describe() reads them. The planner describes a
preset through the same family code as a checkpoint folder."""
from __future__ import annotations

from ..families.spec import Vocabulary
from .preset_idefics2 import IDEFICS2_SPECIAL_IDS, Idefics2Shape
from .preset_onevision import ONEVISION_SPECIAL_IDS, OnevisionShape
from .preset_instructblip import InstructBlipShape
from .preset_paligemma import PaliGemmaShape
from .preset_qwen_vl import QWEN2VL_SPECIAL_IDS, Qwen3VLShape, QwenVLShape
from .presets import (INTERNVL_SPECIAL_IDS, LLAVA15_SPECIAL_IDS, SMOLVLM_SPECIAL_IDS, Gemma3Shape, InternVLShape,
                      LlavaShape)

QWEN_MIN_PIXELS = 56 * 56  # build_preset's processor
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _vocabulary(special_ids: dict[int, str], **options: str) -> Vocabulary:
    return Vocabulary({text: token_id for token_id, text in special_ids.items()}, options)


def preset_files(shape) -> tuple[dict, dict, Vocabulary]:
    """(config.json, processor config, vocabulary) of the checkpoint build_preset would write for this shape."""
    tower = dict(hidden_size=shape.vision_hidden, intermediate_size=shape.vision_mlp,
                 num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads)
    if isinstance(shape, Gemma3Shape):
        from .preset_gemma3 import GEMMA3_SPECIAL_IDS, files

        return (*files(shape), _vocabulary(GEMMA3_SPECIAL_IDS))
    if isinstance(shape, PaliGemmaShape):
        from .preset_paligemma import files as paligemma_files, special_ids

        return (*paligemma_files(shape), _vocabulary(special_ids(shape)))
    if isinstance(shape, QwenVLShape):
        if shape.version == "2":
            vision = dict(depth=shape.vision_layers, embed_dim=shape.vision_hidden, num_heads=shape.vision_heads,
                          mlp_ratio=shape.vision_mlp // shape.vision_hidden)
        else:
            vision = dict(depth=shape.vision_layers, hidden_size=shape.vision_hidden, num_heads=shape.vision_heads,
                          intermediate_size=shape.vision_mlp)
        vision.update(patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        arch = "Qwen2VLForConditionalGeneration" if shape.version == "2" else "Qwen2_5_VLForConditionalGeneration"
        text = {"model_type": "qwen2_vl_text" if shape.version == "2" else "qwen2_5_vl_text",
                "rope_parameters": {"mrope_section": list(shape.mrope_section)}}
        config = {"architectures": [arch], "vision_config": vision, "text_config": text, "image_token_id": 151655}
        processor = {"min_pixels": QWEN_MIN_PIXELS, "max_pixels": shape.max_pixels, "patch_size": 14,
                     "temporal_patch_size": 2, "merge_size": 2}
        return config, processor, _vocabulary(QWEN2VL_SPECIAL_IDS)
    if isinstance(shape, Qwen3VLShape):
        vision = dict(depth=shape.vision_layers, hidden_size=shape.vision_hidden, num_heads=shape.vision_heads,
                      intermediate_size=shape.vision_mlp, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                      out_hidden_size=shape.text_hidden, num_position_embeddings=shape.position_embeddings,
                      deepstack_visual_indexes=list(shape.deepstack))
        text = {"model_type": "qwen3_vl_text", "num_hidden_layers": shape.text_layers,
                "rope_parameters": {"mrope_section": list(shape.mrope_section), "mrope_interleaved": True}}
        config = {"architectures": ["Qwen3VLForConditionalGeneration"], "vision_config": vision, "text_config": text,
                  "image_token_id": 151655}
        processor = {"size": {"shortest_edge": shape.min_pixels, "longest_edge": shape.max_pixels}, "patch_size": 16,
                     "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
        return config, processor, _vocabulary(QWEN2VL_SPECIAL_IDS)
    if isinstance(shape, InternVLShape):
        vision = dict(tower, image_size=[shape.image, shape.image], patch_size=[shape.patch, shape.patch])
        config = {"architectures": ["InternVLForConditionalGeneration"], "vision_config": vision,
                  "text_config": {"model_type": "qwen2"}, "image_token_id": 151667, "downsample_ratio": 0.5}
        processor = {"size": {"height": shape.image, "width": shape.image}, "min_patches": 1,
                     "max_patches": shape.max_patches, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD}
        return config, processor, _vocabulary(INTERNVL_SPECIAL_IDS, start_image_token="<img>", end_image_token="</img>")
    if isinstance(shape, LlavaShape):
        vision = dict(tower, model_type="clip_vision_model", image_size=shape.image, patch_size=shape.patch)
        config = {"architectures": ["LlavaForConditionalGeneration"], "vision_config": vision,
                  "text_config": {"model_type": "llama"}, "image_token_id": 32000, "vision_feature_layer": -2,
                  "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu"}
        processor = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": shape.image},
                     "crop_size": {"height": shape.image, "width": shape.image}, "image_mean": CLIP_MEAN,
                     "image_std": CLIP_STD}
        return config, processor, _vocabulary(LLAVA15_SPECIAL_IDS)
    if isinstance(shape, OnevisionShape):
        from .preset_onevision import files

        return (*files(shape), _vocabulary(ONEVISION_SPECIAL_IDS))
    if isinstance(shape, InstructBlipShape):
        from .preset_instructblip import INSTRUCTBLIP_SPECIAL_IDS, files

        return (*files(shape), _vocabulary(INSTRUCTBLIP_SPECIAL_IDS))
    if isinstance(shape, Idefics2Shape):
        config = {"architectures": ["Idefics2ForConditionalGeneration"], "image_token_id": 32001,
                  "vision_config": dict(tower, image_size=shape.image, patch_size=shape.patch),
                  "perceiver_config": {"resampler_n_latents": shape.latents},
                  "text_config": {"model_type": "mistral", "sliding_window": shape.sliding_window}}
        processor = {"size": {"shortest_edge": shape.shortest_edge, "longest_edge": shape.image}, "resample": 2,
                     "do_image_splitting": False, "image_seq_len": shape.latents}
        return config, processor, _vocabulary(IDEFICS2_SPECIAL_IDS)
    arch = "SmolVLMForConditionalGeneration" if shape.architecture == "smolvlm" else "Idefics3ForConditionalGeneration"
    config = {"architectures": [arch], "vision_config": dict(tower, image_size=shape.image, patch_size=shape.patch),
              "text_config": {"model_type": "llama"}, "scale_factor": shape.scale_factor, "image_token_id": 49190}
    processor = {"size": {"longest_edge": 4 * shape.image}, "max_image_size": {"longest_edge": shape.image},
                 "do_image_splitting": True, "resample": 1}
    return config, processor, _vocabulary(SMOLVLM_SPECIAL_IDS)
