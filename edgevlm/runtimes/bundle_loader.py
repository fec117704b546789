"""Opening a bundle: verify the manifest and the artifacts in use, pick backends, build the Session."""
from __future__ import annotations

from pathlib import Path

from ..errors import BadInputError, BundleError
from ..manifest import INSTRUCTION_TOKENIZER, Manifest
from ..video.kinds import video_spec_from_dict
from .session import RuntimeSpec, Session

# default choice when the caller names none: fastest first on a CPU
ENCODER_PREFERENCE = ("tensorrt:fp16", "tensorrt:int8", "onnx:int8", "onnx:fp32", "onnx:fp16",
                      "mlx:fp16", "mlx:8bit", "mlx:4bit", "mlx:fp32")
DECODER_PREFERENCE = ("gguf:q8_0", "gguf:q6_k", "gguf:q5_k_m", "gguf:q4_k_m", "gguf:q4_0", "gguf:f16", "gguf:f32",
                      "mlx:8bit", "mlx:4bit", "mlx:fp16", "mlx:fp32")


def pick(manifest: Manifest, role: str, choice: str | None, preference: tuple[str, ...]) -> str:
    have = manifest.names(role, runnable=True) + (manifest.names("engine") if role == "encoder" else [])
    if choice:
        if choice == "torch" or choice in have:
            return choice
        if role == "encoder" and choice in manifest.mmproj_names():
            raise BadInputError(f"{choice} is llama.cpp's mmproj, which edgevlm does not run itself (see `edgevlm inspect "
                                f"BUNDLE` for the llama.cpp command line); choose from {', '.join(have) or 'none'}")
        raise BadInputError(f"the bundle has no {role} {choice!r}; it has: {', '.join(have) or 'none'} "
                            "(export more with `edgevlm export --" + role + " ...`)")
    for name in preference:
        if name in have:
            return name
    mmprojs = manifest.mmproj_names() if role == "encoder" else []
    if mmprojs:
        raise BundleError(f"the bundle's only encoder is llama.cpp's mmproj ({', '.join(mmprojs)}), which edgevlm does "
                          "not run itself; export an ONNX encoder too (--encoder onnx:int8) or run the bundle in "
                          "llama.cpp (`edgevlm inspect BUNDLE` prints the command)")
    raise BundleError(f"the bundle has no {role}; export one with `edgevlm export --{role} ...`")


def runtime_spec(bundle: Path, manifest: Manifest) -> RuntimeSpec:
    """Tokenizer and chat template without transformers (runtimes/tokenizer.py): a device needs neither it nor torch,
    and a CUDA torch loaded beside a CUDA llama.cpp is one more thing that can break."""
    from .tokenizer import BundleTokenizer

    manifest.find("tokenizer").verify(bundle)
    tokenizer = BundleTokenizer(bundle / manifest.tokenizer["path"])
    instruction = manifest.encoder.instruction
    if instruction:  # the encoder reads the prompt too (InstructBLIP): its own tokenizer, shipped in the bundle
        from .tokenizer import InstructionTokenizer

        manifest.find("tokenizer", INSTRUCTION_TOKENIZER).verify(bundle)
        instruction = InstructionTokenizer(bundle / instruction["tokenizer"], instruction["max_tokens"])
    return RuntimeSpec(
        tokenizer=tokenizer,
        chat_template=manifest.tokenizer.get("chat_template"),
        preprocess=manifest.preprocess,
        layout=manifest.image_layout,
        stop_token_ids=list(manifest.tokenizer.get("stop_token_ids", [])),
        position_scheme=manifest.decoder.position_scheme,
        image_attention=manifest.decoder.image_attention,
        instruction_tokenizer=instruction or None,
        video=video_spec_from_dict(manifest.video),
    )


def source_checkpoint(manifest: Manifest, dtype: str = "float32"):
    """The checkpoint the bundle came from, for the torch reference backends (verify, eval). dtype "auto": the
    checkpoint's stored dtype (a bf16 model whose float32 copy would not fit in memory; the bench records it)."""
    from ..families import load_checkpoint

    path = Path(manifest.source["path"])
    if not (path / "config.json").is_file():
        raise BadInputError(f"the torch backend needs the source checkpoint {path}, which is gone; run it on an artifact")
    ckpt = load_checkpoint(path, dtype)
    if ckpt.source_sha256 != manifest.source["sha256"]:
        raise BundleError(f"the checkpoint at {path} changed since the bundle was exported (sha256 differs); re-export")
    return ckpt


# Each backend is imported when it is chosen (ONNX Runtime, TensorRT, MLX are optional), by a plain import
# statement so that tests/test_layering.py's import graph sees the edge.
def _onnx_backend():
    from .onnx_encoder import OnnxRuntimeEncoder

    return OnnxRuntimeEncoder


def _tensorrt_backend():
    from .tensorrt_encoder import TensorRTEncoder

    return TensorRTEncoder


def _mlx_backend():
    from .mlx_encoder import MlxEncoder  # mlx-vlm's vision modules (edgevlm/mlx_vision.py)

    return MlxEncoder


# artifact format -> (what imports the backend class, the manifest role it reads, the options it takes)
ENCODER_BACKENDS = {
    "onnx": (_onnx_backend, "encoder", ("provider", "threads")),
    "tensorrt": (_tensorrt_backend, "engine", ()),
    "mlx": (_mlx_backend, "encoder", ()),
}


def make_encoder(bundle: Path, manifest: Manifest, name: str, provider=None, threads=None, ckpt=None):
    if name == "torch":
        from .torch_backend import TorchEncoder

        ckpt = ckpt or source_checkpoint(manifest)
        return TorchEncoder(ckpt.vision, f"torch:{ckpt.source_sha256}")
    fmt = name.split(":", 1)[0]
    if fmt not in ENCODER_BACKENDS:
        raise BadInputError(f"no encoder backend runs {name!r}; formats: {', '.join(ENCODER_BACKENDS)}")
    backend, role, takes = ENCODER_BACKENDS[fmt]
    options = {key: value for key, value in (("provider", provider), ("threads", threads)) if key in takes}
    return backend()(bundle, manifest.find(role, name), manifest.encoder, **options)


def holds_sequences(decoder_name: str) -> bool:
    """Whether the decoder's context holds several sequences (llama.cpp); the others serve one at a time."""
    return decoder_name.startswith("gguf:")


def check_sequences(n_seq: int, decoder_name: str) -> None:
    if n_seq < 1:
        raise BadInputError(f"the number of sequences must be >= 1, got {n_seq}")
    if n_seq > 1 and not holds_sequences(decoder_name):
        raise BadInputError(f"--parallel {n_seq} needs a llama.cpp (gguf) decoder; the {decoder_name} decoder serves "
                            "one request at a time (use --parallel 1)")


def make_decoder(bundle: Path, manifest: Manifest, name: str, n_ctx=None, threads=None, parity=False, ckpt=None,
                 n_seq: int = 1, flash_attn: bool | None = None):
    """The decoder `name` of the bundle: sequence 0 of a context of n_seq sequences (`decoder.context`) for gguf
    (flash_attn None: measured once per CPU, llamacpp.flash_choice)."""
    check_sequences(n_seq, name)
    if name == "torch":
        from .torch_seq2seq import torch_decoder

        ckpt = ckpt or source_checkpoint(manifest)
        return torch_decoder(ckpt.decoder, n_ctx=n_ctx, position_scheme=manifest.decoder.position_scheme,
                             deepstack_layers=manifest.encoder.row_slices - 1, image_attention=manifest.decoder.image_attention)
    artifact = manifest.find("decoder", name)
    artifact.verify(bundle)
    artifact_id = f"{artifact.name}:{artifact.files[0].sha256}"
    if artifact.format == "gguf":
        from .llamacpp import DEFAULT_N_BATCH, open_decoder

        # a bidirectional image block goes in as one micro-batch: n_batch holds the largest tile's rows; a prefix-LM
        # prompt (PaliGemma) is one micro-batch too: room for one image and DEFAULT_N_BATCH positions of text
        mode, tile = manifest.decoder.image_attention, manifest.image_layout.tokens_per_tile
        n_batch = {"bidirectional": max(DEFAULT_N_BATCH, tile), "prefix": tile + DEFAULT_N_BATCH}.get(mode, DEFAULT_N_BATCH)
        return open_decoder(bundle / artifact.path, n_ctx=n_ctx, threads=threads, parity=parity,
                            context_length=manifest.decoder.context_length, artifact_id=artifact_id, n_seq=n_seq,
                            n_batch=n_batch, image_attention=manifest.decoder.image_attention, flash_attn=flash_attn)
    from .mlx_decoder import MlxDecoder

    from ..decoder_arch import architecture

    return MlxDecoder(bundle / artifact.path, n_ctx=n_ctx or manifest.decoder.context_length,
                      mrope_section=manifest.decoder.mrope_section, artifact_id=artifact_id,
                      mrope_interleaved=architecture(manifest.decoder.architecture).mrope_interleaved,
                      deepstack_layers=manifest.encoder.row_slices - 1, image_attention=manifest.decoder.image_attention)


def session_from_bundle(path, encoder=None, decoder=None, n_ctx=None, threads=None, provider=None, parity=False,
                        n_seq: int = 1, torch_dtype: str = "float32", job=None, flash_attn: bool | None = None,
                        encoder_threads: int | None = None, **cache_options) -> Session:
    """n_seq: sequences of the decoder's context (llama.cpp only; `serve --parallel N` opens one context of N);
    torch_dtype: the torch backends' weights, "float32" or "auto" (as the checkpoint stores them); job
    (job_context.Job): what a one-shot command will ask, which sizes a llama.cpp context where n_ctx is not given;
    flash_attn: llama.cpp's flash attention on/off (None: chosen per CPU); encoder_threads: the ONNX encoder's own
    threads (default `threads`; a server encodes beside its decodes, --encode-threads)."""
    bundle = Path(path)
    manifest = Manifest.load(bundle)
    if n_ctx is not None and not 1 <= n_ctx <= manifest.decoder.context_length:
        raise BadInputError(f"--n-ctx {n_ctx} is beyond the model's context of {manifest.decoder.context_length} "
                            "positions; choose at most that")
    encoder_name = pick(manifest, "encoder", encoder, ENCODER_PREFERENCE)
    decoder_name = pick(manifest, "decoder", decoder, DECODER_PREFERENCE)
    check_sequences(n_seq, decoder_name)  # before anything loads
    ckpt = source_checkpoint(manifest, torch_dtype) if "torch" in (encoder_name, decoder_name) else None
    if ckpt is not None and threads:
        import torch

        torch.set_num_threads(int(threads))  # the torch backends honour --threads too
    spec = runtime_spec(bundle, manifest)
    if n_ctx is None and job is not None and decoder_name.startswith("gguf"):
        from .job_context import job_context

        n_ctx = job_context(job, spec, manifest.decoder.context_length)
    return Session(
        spec,
        make_encoder(bundle, manifest, encoder_name, provider=provider, threads=encoder_threads or threads, ckpt=ckpt),
        make_decoder(bundle, manifest, decoder_name, n_ctx=n_ctx, threads=threads, parity=parity, ckpt=ckpt,
                     n_seq=n_seq, flash_attn=flash_attn),
        encoder_name=encoder_name, decoder_name=decoder_name,
        **cache_options,
    )
