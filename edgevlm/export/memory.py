"""Memory hygiene for exports of real checkpoints."""
from __future__ import annotations

import gc


def release_memory() -> None:
    """Freed tensors and ONNX Runtime sessions back to the OS now: glibc keeps freed heap pages mapped, and the RSS
    of the steps after a release would otherwise still count them."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass
