"""User-facing errors: one line that names the problem and the fix. The CLI prints them without a traceback."""


class EdgeVLMError(Exception):
    """Base of every error a user can cause and fix (bad input, wrong checkpoint, tampered bundle)."""

    exit_code = 2


class BadInputError(EdgeVLMError):
    """An image, prompt or option the tool cannot use."""


class CheckpointError(EdgeVLMError):
    """A checkpoint folder that is missing files or has an unsupported architecture."""


class BundleError(EdgeVLMError):
    """A bundle that is incomplete, tampered with or from another version."""


class BackendUnavailableError(EdgeVLMError):
    """A runtime (TensorRT, CUDA, MLX, llama.cpp) that is not installed or has no device here."""


class ExportError(EdgeVLMError):
    """An export that cannot meet its accuracy contract (e.g. an int8 encoder below the ladder's cosine)."""
