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
    return RuntimeSpec(
        tokenizer=ckpt.tokenizer,
        chat_template=ckpt.chat_template,
        preprocess=family.preprocess,
        layout=family.layout,
        stop_token_ids=list(ckpt.stop_token_ids),
        position_scheme=family.position_scheme,
    )


def session_from_checkpoint(ckpt, n_ctx: int | None = None, **cache_options) -> Session:
    from .runtimes.torch_backend import TorchDecoder, TorchEncoder

    return Session(
        spec_from_checkpoint(ckpt),
        TorchEncoder(ckpt.vision, f"torch:{ckpt.source_sha256}"),
        TorchDecoder(ckpt.decoder, n_ctx=n_ctx),
        encoder_name=TORCH, decoder_name=TORCH,
        **cache_options,
    )


def is_bundle(path: Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


def load_session(path, encoder: str | None = None, decoder: str | None = None, n_ctx: int | None = None, **options) -> Session:
    path = Path(path)
    if is_bundle(path):
        from .runtimes.bundle_loader import session_from_bundle

        return session_from_bundle(path, encoder=encoder, decoder=decoder, n_ctx=n_ctx, **options)
    for name, choice in (("encoder", encoder), ("decoder", decoder)):
        if choice not in (None, TORCH):
            raise BadInputError(
                f"{path} is a checkpoint, which runs on the torch {name} only; export a bundle for --{name} {choice}"
            )
    from .families import load_checkpoint

    from .backends import thread_count

    threads = options.pop("threads", None)
    thread_count(threads)  # validated even though only torch uses it here
    options.pop("provider", None), options.pop("parity", None)
    if threads:
        import torch

        torch.set_num_threads(int(threads))  # the PyTorch reference honours --threads too (process-wide)
    ckpt = load_checkpoint(path)
    if n_ctx is not None and not 1 <= n_ctx <= ckpt.context_length:
        raise BadInputError(f"--n-ctx {n_ctx} is beyond the model's context of {ckpt.context_length} positions; "
                            "choose at most that")
    return session_from_checkpoint(ckpt, n_ctx=n_ctx, **options)
