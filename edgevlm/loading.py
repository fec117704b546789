"""Turning a path into a ready Session: a checkpoint folder runs on the torch backends, a bundle on its artifacts."""
from __future__ import annotations

from pathlib import Path

from .errors import BadInputError
from .runtimes.session import RuntimeSpec, Session

TORCH = "torch"


def spec_from_checkpoint(ckpt) -> RuntimeSpec:
    """The prompt building's family facts from the family's description (a bundle carries the same in its
    manifest, written from it at export)."""
    family = ckpt.spec
    instruction = None
    if family.instruction is not None:  # the same torch-free tokenizer a bundle's runtime uses
        from .runtimes.tokenizer import InstructionTokenizer

        instruction = InstructionTokenizer(ckpt.path / family.instruction.tokenizer, family.instruction.max_tokens)
    return RuntimeSpec(
        tokenizer=ckpt.tokenizer,
        chat_template=ckpt.chat_template,
        preprocess=family.preprocess,
        layout=family.layout,
        stop_token_ids=list(ckpt.stop_token_ids),
        position_scheme=family.position_scheme,
        image_attention=family.image_attention,
        instruction_tokenizer=instruction,
        video=family.video,
    )


def session_from_checkpoint(ckpt, n_ctx: int | None = None, **cache_options) -> Session:
    from .runtimes.torch_backend import TorchEncoder
    from .runtimes.torch_seq2seq import torch_decoder

    return Session(
        spec_from_checkpoint(ckpt),
        TorchEncoder(ckpt.vision, f"torch:{ckpt.source_sha256}"),
        torch_decoder(ckpt.decoder, n_ctx=n_ctx, position_scheme=ckpt.position_scheme,
                      deepstack_layers=ckpt.spec.deepstack_layers, image_attention=ckpt.spec.image_attention),
        encoder_name=TORCH, decoder_name=TORCH,
        **cache_options,
    )


def is_bundle(path: Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


def holds_sequences(path, decoder: str | None = None) -> bool:
    """Whether the decoder `load_session` would open holds several sequences in one context (a bundle's gguf
    decoder, on llama.cpp); checkpoints run on torch, one sequence."""
    if not is_bundle(path):
        return False
    from .manifest import Manifest
    from .runtimes import bundle_loader

    manifest = Manifest.load(Path(path))
    return bundle_loader.holds_sequences(bundle_loader.pick(manifest, "decoder", decoder, bundle_loader.DECODER_PREFERENCE))


def load_session(path, encoder: str | None = None, decoder: str | None = None, n_ctx: int | None = None,
                 n_seq: int = 1, **options) -> Session:
    """n_seq: sequences of the decoder's context, opened once (llama.cpp only: `serve --parallel N`)."""
    path = Path(path)
    if is_bundle(path):
        from .runtimes.bundle_loader import session_from_bundle

        return session_from_bundle(path, encoder=encoder, decoder=decoder, n_ctx=n_ctx, n_seq=n_seq, **options)
    for name, choice in (("encoder", encoder), ("decoder", decoder)):
        if choice not in (None, TORCH):
            raise BadInputError(
                f"{path} is a checkpoint, which runs on the torch {name} only; export a bundle for --{name} {choice}"
            )
    from .backends import thread_count
    from .families import load_checkpoint
    from .runtimes.bundle_loader import check_sequences

    check_sequences(n_seq, TORCH)
    threads = options.pop("threads", None)
    thread_count(threads)  # validated even though only torch uses it here
    options.pop("provider", None), options.pop("parity", None), options.pop("encoder_threads", None)
    options.pop("job", None), options.pop("flash_attn", None)  # llama.cpp's context settings
    torch_dtype = options.pop("torch_dtype", "float32")
    if threads:
        import torch

        torch.set_num_threads(int(threads))  # the PyTorch reference honours --threads too (process-wide)
    ckpt = load_checkpoint(path, torch_dtype)
    if n_ctx is not None and not 1 <= n_ctx <= ckpt.context_length:
        raise BadInputError(f"--n-ctx {n_ctx} is beyond the model's context of {ckpt.context_length} positions; "
                            "choose at most that")
    return session_from_checkpoint(ckpt, n_ctx=n_ctx, **options)
