"""`edgevlm export`: checkpoint -> bundle. Builds the manifest from the family adapter, then writes each requested
artifact (encoder/decoder formats are plugins under edgevlm/export/) into an atomic bundle."""
from __future__ import annotations

import importlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..decoder_arch import architecture
from ..errors import BadInputError
from ..manifest import INSTRUCTION_TOKENIZER, MMPROJ_PRECISIONS, DecoderSpec, EncoderSpec, Manifest
from .bundle import BundleWriter, recover_interrupted, write_bundle
from .memory import release_memory

# format -> (module under edgevlm.export, precisions); the first precision is the default
# "gguf" on the encoder side is llama.cpp's mmproj (artifact name mmproj:<precision>); "mmproj" is the same writer
ENCODER_FORMATS = {"onnx": ("onnx", ("fp32", "fp16", "int8")), "gguf": ("mmproj", MMPROJ_PRECISIONS),
                   "mmproj": ("mmproj", MMPROJ_PRECISIONS),
                   "mlx": ("mlx", ("fp16", "8bit", "4bit", "fp32"))}  # mlx-vlm's vision modules (export/mlx_encoder.py)
DECODER_FORMATS = {
    "gguf": ("gguf", ("f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")),
    "mlx": ("mlx", ("fp32", "fp16", "8bit", "4bit")),
}
INSTRUCTION_INPUTS = ("qformer_input_ids", "qformer_attention_mask")  # HF's names, (tiles, n) int64 each
DEFAULT_MAX_TILES = 17  # SmolVLM splits up to 4x4 tiles + the global view


@dataclass(frozen=True)
class ArtifactRequest:
    format: str
    precision: str

    @property
    def name(self) -> str:
        return f"{self.format}:{self.precision}"


INT8_REQUEST = ArtifactRequest("onnx", "int8")


def parse_requests(text: str | None, formats: dict, role: str) -> list[ArtifactRequest]:
    """"onnx:fp32,onnx:int8" -> requests; a bad entry names the valid choices."""
    requests = []
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        fmt, _, precision = item.partition(":")
        if fmt not in formats:
            raise BadInputError(f"unknown {role} format {fmt!r} in {item!r}; choose from {', '.join(formats)}")
        precisions = formats[fmt][1]
        precision = precision or precisions[0]
        if precision not in precisions:
            raise BadInputError(f"{role} {fmt} has no precision {precision!r}; choose from {', '.join(precisions)}")
        request = ArtifactRequest(formats[fmt][0], precision)  # the writer module's name is the canonical format
        if request not in requests:  # gguf:f16 and mmproj:f16 name the same encoder artifact
            requests.append(request)
    return requests


def encoder_spec(ckpt, max_tiles: int) -> EncoderSpec:
    """The encoder contract, its output shape measured once by running the vision module on zeros."""
    if getattr(ckpt.vision, "grid_spec", None) is not None:
        return grid_encoder_spec(ckpt)
    tile_h, tile_w = ckpt.preprocess.tile_size
    channels = ckpt.preprocess.channels  # RGB, + the pixel mask of padded tiles (idefics2)
    import torch

    with torch.inference_mode():
        probe = ckpt.vision(torch.zeros(1, channels, tile_h, tile_w, dtype=ckpt.vision_dtype))  # (1, T, D)
    tokens, dim = int(probe.shape[1]), int(probe.shape[2])
    if tokens != ckpt.layout.tokens_per_tile:
        raise BadInputError(f"the vision module makes {tokens} tokens per tile but the processor expects "
                            f"{ckpt.layout.tokens_per_tile}; the checkpoint's processor config does not match the model")
    instruction = ckpt.spec.instruction
    if instruction is not None:  # InstructBLIP: the graph reads the prompt's Q-Former ids and mask too
        instruction = {"tokenizer": "qformer_tokenizer", "max_tokens": instruction.max_tokens,
                       "inputs": list(INSTRUCTION_INPUTS), "default_ids": ckpt.vision.default_ids[0].tolist()}
    return EncoderSpec("pixel_values", "image_embeds", ["tiles", channels, tile_h, tile_w], ["tiles", tokens, dim],
                       max_tiles, instruction=instruction)


def grid_encoder_spec(ckpt) -> EncoderSpec:
    """A native-resolution encoder (Qwen2-VL): one image of any size per call, so every input and both axes are named
    (edgevlm/vision_grid.py computes the auxiliary inputs at run time). The probe runs the smallest image."""
    import torch

    from ..preprocess import max_merged_tokens
    from ..vision_grid import OUTPUT, PATCHES_INPUT

    grid_spec, preprocess = ckpt.vision.grid_spec, ckpt.preprocess
    for key in ("patch_size", "temporal_patch_size", "merge_size"):
        if getattr(preprocess, key) != getattr(grid_spec, key):
            raise BadInputError(f"the processor's {key} is {getattr(preprocess, key)} but the vision config's is "
                                f"{getattr(grid_spec, key)}; the checkpoint's processor config does not match the model")
    merge = grid_spec.merge_size
    with torch.inference_mode():
        probe = ckpt.vision(torch.zeros(merge * merge, grid_spec.patch_dim, dtype=ckpt.vision_dtype), (1, merge, merge))
    if tuple(probe.shape[:1]) != (1,):
        raise BadInputError(f"the vision module makes {probe.shape[0]} tokens for one merge block; expected 1")
    most = max_merged_tokens(preprocess)
    axes = {"merged": {"min": 1, "max": most},
            "patches": {"min": merge * merge, "max": most * merge * merge, "multiple_of": merge * merge}}
    slices = 1 + ckpt.spec.deepstack_layers  # DeepStack: the rows carry k more slices of the decoder's width
    if int(probe.shape[1]) != slices * ckpt.decoder.config.hidden_size:
        raise BadInputError(f"the vision module's rows are {int(probe.shape[1])} wide; expected {slices} slice(s) of "
                            f"the decoder's {ckpt.decoder.config.hidden_size}")
    return EncoderSpec(PATCHES_INPUT, OUTPUT, ["patches", grid_spec.patch_dim], ["merged", int(probe.shape[1])], 1,
                       kind="grid", inputs=grid_spec.graph_inputs(), dynamic_axes=axes, vision_grid=grid_spec.to_dict(),
                       row_slices=slices)


def build_manifest(ckpt, max_tiles: int) -> Manifest:
    config = ckpt.decoder.config
    encoder = encoder_spec(ckpt, max_tiles)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope_theta = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    rope_scaling = getattr(config, "rope_scaling", None)
    local = local_attention(config)
    if local and "full_attention" in (config.rope_parameters or {}):  # Gemma 3: RoPE per layer type; rope_theta
        rope_scaling = dict(config.rope_parameters["full_attention"])  # and any scaling are the global layers'
        rope_theta = rope_scaling.pop("rope_theta")
    # "dynamic" NTK scaling changes nothing up to max_position_embeddings, which is the context edgevlm uses
    # (InternVL3-1B ships factor 2 dynamic); any other scaling is kept and refused by the writers that lack it
    if isinstance(rope_scaling, dict) and rope_scaling.get("rope_type", "default") in ("default", "dynamic"):
        rope_scaling = None
    tokenizer = ckpt.tokenizer
    family = ckpt.spec  # the family's description: what the runtime's prompt building reads back from the manifest
    arch = architecture(family.decoder_architecture)
    mrope_section = ckpt.mrope_section
    return Manifest(
        family=family.family,
        source={"path": str(ckpt.path), "sha256": ckpt.source_sha256,
                "architecture": type(ckpt.hf_model).__name__},
        preprocess=family.preprocess,
        image_layout=family.layout,
        encoder=encoder,
        decoder=DecoderSpec(
            architecture=arch.name, hidden_size=config.hidden_size, n_layers=config.num_hidden_layers,
            # OPT (torch only) names its MLP ffn_dim, T5 (torch only) d_ff; neither has KV groups nor RMS norms
            n_heads=config.num_attention_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads, head_dim=head_dim,
            intermediate_size=getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None) or config.d_ff,
            vocab_size=config.vocab_size,
            context_length=ckpt.context_length, rms_norm_eps=float(getattr(config, "rms_norm_eps", 1e-5)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling, tie_word_embeddings=bool(config.tie_word_embeddings),
            position_scheme=arch.position_schemes[0], mrope_section=mrope_section,
            spatial_merge_size=family.preprocess.merge_size if mrope_section else None,
            image_attention=family.image_attention, **local,
        ),
        tokenizer={
            "path": "tokenizer", "chat_template": ckpt.chat_template, "stop_token_ids": ckpt.stop_token_ids,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        },
        video=family.video.to_dict() if family.video is not None else None,
    )


def local_attention(config) -> dict:
    """The manifest's sliding-window fields of a decoder with local layers (Gemma 3), {} for one without."""
    types = list(getattr(config, "layer_types", None) or [])
    window = getattr(config, "sliding_window", None)
    if "sliding_attention" not in types or not window:
        return {}
    globals_at = [i for i, t in enumerate(types) if t != "sliding_attention"]
    every = globals_at[0] + 1 if globals_at else len(types) + 1
    if [i for i in range(len(types)) if (i + 1) % every == 0] != globals_at:
        raise BadInputError(f"the decoder's layer types {types} are not one global layer every N")
    rope = config.rope_parameters or {}
    # Gemma 3: a RoPE per layer type; Gemma 2: one for all layers
    local_theta = (rope["sliding_attention"] if "sliding_attention" in rope else rope).get("rope_theta", 10000.0)
    return {"sliding_window": int(window), "global_every": every, "rope_local_theta": float(local_theta)}


def write_tokenizer(ckpt, writer: BundleWriter):
    ckpt.tokenizer.save_pretrained(writer.root / "tokenizer")
    sentencepiece_model = Path(ckpt.path) / "tokenizer.model"
    if sentencepiece_model.is_file():  # its piece scores make the GGUF tokenize exactly like SentencePiece
        shutil.copyfile(sentencepiece_model, writer.root / "tokenizer" / "tokenizer.model")
    return writer.artifact("tokenizer", "tokenizer", "hf-tokenizer", "-", "tokenizer")


def write_instruction_tokenizer(ckpt, writer: BundleWriter, instruction: dict):
    """The encoder's own prompt tokenizer (InstructBLIP's Q-Former BERT tokenizer), copied from the checkpoint."""
    source = Path(ckpt.path) / ckpt.spec.instruction.tokenizer
    target = writer.root / instruction["tokenizer"]
    target.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
    return writer.artifact(INSTRUCTION_TOKENIZER, "tokenizer", "hf-tokenizer", "-", instruction["tokenizer"])


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    encoders: list[ArtifactRequest],
    decoders: list[ArtifactRequest],
    max_tiles: int = DEFAULT_MAX_TILES,
    force: bool = False,
    progress=None,
    options: dict | None = None,
) -> Path:
    import torch  # noqa: F401 - first: a runtime-only install is told which extra brings them (cli.py)
    import transformers  # noqa: F401

    from ..families import describe_checkpoint, load_checkpoint

    options = dict(options or {})
    log = progress or (lambda message: None)
    if max_tiles < 1:
        raise BadInputError(f"--max-tiles must be >= 1, got {max_tiles}")
    output = Path(output)
    if output.parent.is_dir():
        recover_interrupted(output.absolute())  # leftovers of a killed export of this target
    if output.exists() and not force:
        raise BadInputError(f"{output} already exists; choose another -o or pass --force to replace it")
    spec = describe_checkpoint(checkpoint)  # torch-free: what the family's description refuses, before the load
    refusal = architecture(spec.decoder_architecture).export_refusal
    if decoders and refusal:  # e.g. BLIP-2's OPT: no GGUF/MLX decoder can be written
        raise BadInputError(refusal)
    for request in encoders:  # a format the family has no writer for is refused before the (slow) load
        module = _module(ENCODER_FORMATS, request)
        if hasattr(module, "check_spec"):
            module.check_spec(spec)
    log(f"loading {checkpoint}")
    ckpt = load_checkpoint(checkpoint, dtype="auto")  # stored dtype: no fp32 copy of a bf16 checkpoint
    for request in encoders:  # refuse what cannot be written before the slow artifacts are
        module = _module(ENCODER_FORMATS, request)
        if hasattr(module, "check_encoder"):
            module.check_encoder(ckpt, request.precision)
    manifest = build_manifest(ckpt, max_tiles)
    tensor_progress = options.pop("tensor_progress", None)
    with write_bundle(output, manifest, overwrite=force) as writer:
        manifest.artifacts.append(write_tokenizer(ckpt, writer))
        if manifest.encoder.instruction:
            manifest.artifacts.append(write_instruction_tokenizer(ckpt, writer, manifest.encoder.instruction))
        # Memory: the decoder's inputs (GGUF files, the quantizer's 16-bit input, mlx-lm's HF folder) are written
        # first, straight from the stored-dtype weights; then the decoder is freed before llama.cpp's quantizer,
        # mlx-lm and the vision export run, so no step holds two copies of the model.
        for request in decoders:
            log(f"decoder {request.name}: writing from the checkpoint")
            _module(DECODER_FORMATS, request).prepare_decoder(ckpt, manifest, writer, request.precision, log=log,
                                                             tensor_progress=tensor_progress, **options)
        ckpt.release_decoder()
        release_memory()
        decoder_artifacts = []
        for i, request in enumerate(decoders):
            log(f"decoder {request.name}")
            module = _module(DECODER_FORMATS, request)
            decoder_artifacts.append(module.export_decoder(ckpt, manifest, writer, request.precision, log=log, **options))
            if all(r.format != request.format for r in decoders[i + 1 :]):
                module.release_intermediates(writer)
        if encoders:
            ckpt.vision.float()  # the encoder graphs are exported in fp32 (fp16/int8 variants derive from it)
        # onnx:int8 last: it needs only the fp32 graph, so the torch vision half is freed before the quantizers run
        ordered = sorted(encoders, key=lambda r: r == INT8_REQUEST)
        encoder_artifacts = {}
        for i, request in enumerate(ordered):
            log(f"encoder {request.name}")
            module = _module(ENCODER_FORMATS, request)
            if request == INT8_REQUEST:
                module.ensure_fp32_graph(ckpt, manifest, writer, log)
                ckpt.release_weights()
                release_memory()
            encoder_artifacts[request] = module.export_encoder(ckpt, manifest, writer, request.precision, log=log, **options)
            if all(r.format != request.format for r in ordered[i + 1 :]) and hasattr(module, "release_intermediates"):
                module.release_intermediates(writer)
        manifest.artifacts.extend(encoder_artifacts[r] for r in encoders)
        manifest.artifacts.extend(decoder_artifacts)
    return output


def _module(formats: dict, request: ArtifactRequest):
    return importlib.import_module(f"{__package__}.{formats[request.format][0]}")
