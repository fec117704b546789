"""edgevlm: export a vision-language model as a split graph (ONNX encoder + GGUF/MLX decoder) and run it on-device."""
from __future__ import annotations

__version__ = "0.1.0"


def load(path, encoder: str | None = None, decoder: str | None = None, n_seq: int = 1, **options):
    """Open a checkpoint folder (torch backends) or a bundle (backends chosen from its artifacts) as a Session.
    n_seq: sequences of the decoder's context (llama.cpp), for a server answering that many requests at once."""
    from .loading import load_session

    return load_session(path, encoder=encoder, decoder=decoder, n_seq=n_seq, **options)


__all__ = ["__version__", "load"]
