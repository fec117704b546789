"""BLIP-2 (Blip2ForConditionalGeneration) and InstructBLIP (InstructBlipForConditionalGeneration): an EVA ViT, a
Q-Former bridge (`num_query_tokens` learned queries cross-attending to the ViT's patches; InstructBLIP's Q-Former
also reads the prompt through its own BERT tokenizer, shipped in `qformer_tokenizer/`), a linear projection into the
decoder: every image is `num_query_tokens` rows, placed before the whole prompt (BOS included), as the processors do.
Decoders: a Llama (InstructBLIP-Vicuna: the llama row, GGUF and MLX); OPT (BLIP-2: the opt row, torch only, GGUF and
MLX refused); Flan-T5 (BLIP-2: the t5 row, torch only, GGUF and MLX refused): an encoder-decoder whose encoder reads
the whole prompt bidirectionally, so the prompt is one prefix-LM block (image_attention "prefix": never extended in
place). describe() is torch-free; load() builds the PyTorch modules (blip2_vision.QFormerBridge)."""
from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from ..layout import ImageLayout
from ..preprocess import PreprocessSpec
from .files import resample_name
from .spec import PINNED_LLAMA_CPP, FamilySpec, InstructionInput, Vocabulary, VisionShapes, decoder_row

ARCHITECTURES = ("Blip2ForConditionalGeneration", "InstructBlipForConditionalGeneration")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# transformers' Blip2VisionConfig / InstructBlipVisionConfig and Q-Former defaults, for keys a config.json may omit
TOWER_DEFAULTS = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                      image_size=224, patch_size=14)
QFORMER_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        max_position_embeddings=512, cross_attention_frequency=2)
N_QUERIES = 32
QFORMER_TOKENIZER = "qformer_tokenizer"  # where InstructBlipProcessor.save_pretrained puts the Q-Former's tokenizer
MMPROJ_REFUSAL = (f"{PINNED_LLAMA_CPP} has no BLIP-2 projector type (clip-impl.h lists no Q-Former), so no mmproj "
                  "can be written; export --encoder onnx:... (a Llama decoder's GGUF runs in llama.cpp as usual)")
# T5 has relative positions and no maximum; Flan-T5's tokenizer caps its inputs at 512 (runtimes/torch_seq2seq.py)
T5_CONTEXT = 512


def preprocess_spec(processor: dict, image_size: int) -> PreprocessSpec:
    size = processor.get("size") or {"height": image_size, "width": image_size}
    if "height" not in size:
        raise CheckpointError(f"BLIP image processor size {size} is not supported (height and width, as published)")
    return PreprocessSpec("fixed", (int(size["height"]), int(size["width"])),
                          resample=resample_name(processor.get("resample", 3)),
                          rescale_factor=float(processor.get("rescale_factor", 1 / 255)),
                          image_mean=processor.get("image_mean", CLIP_MEAN), image_std=processor.get("image_std", CLIP_STD))


def _shape(config: dict, key: str, defaults: dict) -> dict:
    return {**defaults, **{k: v for k, v in (config.get(key) or {}).items() if v is not None}}


def describe(config: dict, processor: dict, tokenizer: Vocabulary) -> FamilySpec:
    architecture = next((a for a in config.get("architectures") or [] if a in ARCHITECTURES), ARCHITECTURES[0])
    tower = _shape(config, "vision_config", TOWER_DEFAULTS)
    qformer = _shape(config, "qformer_config", QFORMER_DEFAULTS)
    image, patch = int(tower["image_size"]), int(tower["patch_size"])
    queries = int(config.get("num_query_tokens", N_QUERIES))
    written = processor.get("num_query_tokens")
    if written is not None and int(written) != queries:
        raise CheckpointError(f"the processor writes {written} image tokens per image but the Q-Former has {queries} "
                              "queries; the checkpoint's files do not belong together")
    image_token_id = config.get("image_token_index", config.get("image_token_id"))
    image_token_id = tokenizer.id_of("<image>") if image_token_id is None else image_token_id
    if image_token_id is None:
        raise CheckpointError("neither config.json nor the tokenizer names the image token (<image>); re-save the "
                              "checkpoint with a transformers that writes image_token_index")
    image_token = tokenizer.text_of(int(image_token_id)) or "<image>"
    row = decoder_row(config, "opt")
    instruct = architecture == "InstructBlipForConditionalGeneration"
    instruction = InstructionInput(QFORMER_TOKENIZER, int(qformer["max_position_embeddings"])) if instruct else None
    return FamilySpec(
        family="blip2", architecture=architecture, preprocess=preprocess_spec(processor, image),
        layout=ImageLayout("leading", image_token, image_token, int(image_token_id), queries),
        vision=VisionShapes.of_tower(tower, image, patch, (image // patch) ** 2 + 1, queries,
                                     ("qformer.", "query_tokens", "language_projection.")),
        decoder_architecture=row, mmproj_projector=None, mmproj_refusal=MMPROJ_REFUSAL, instruction=instruction,
        # T5's encoder reads the whole prompt (image rows and text) bidirectionally: one prefix-LM block
        image_attention="prefix" if row == "t5" else "causal",
    )


def load(path: Path, config_json: dict, dtype: str = "float32"):
    import transformers
    from transformers import AutoTokenizer

    from . import base
    from .blip2_vision import QFormerBridge

    weights = base.check_files(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    spec = describe(config_json, base.read_processor_config(path), Vocabulary.from_tokenizer(tokenizer))
    hf_model = getattr(transformers, spec.architecture).from_pretrained(path, dtype=base.torch_dtype(dtype)).eval()
    default_ids = None
    if spec.instruction is not None:
        from ..runtimes.tokenizer import InstructionTokenizer

        default_ids = InstructionTokenizer(path / spec.instruction.tokenizer, spec.instruction.max_tokens)("").tolist()
    language_model = hf_model.language_model
    text = hf_model.config.text_config
    if spec.decoder_architecture in ("opt", "t5"):  # no rotary to rebuild: the OPT causal LM / T5 run as they are
        decoder = language_model
    else:
        decoder = base.decoder_from(text, language_model.model, language_model.lm_head)
    return base.loaded(spec, path, config_json, hf_model, tokenizer, weights,
                       QFormerBridge(hf_model, default_ids).eval(), decoder,
                       context_length=T5_CONTEXT if spec.decoder_architecture == "t5" else None)
