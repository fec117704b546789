"""mlx-vlm's model modules (a family's `language.py`, `vision.py`) imported one by one, torch-free.

`import mlx_vlm.models.<family>.<module>` through the packages runs `mlx_vlm/__init__.py` and the family's
`__init__.py`, which import transformers and torch (their processors) in ~4 s. The language and vision modules
themselves need only mlx and numpy: registering bare namespace packages for `mlx_vlm`, `mlx_vlm.models` and the family
lets Python load them with `config.py` and their shared helpers (base, cache, attention, mlp) alone. A process that
imported the real `mlx_vlm` package first keeps it (the peers of `edgevlm bench` run in their own processes).

Shared by the runtime's MLX decoder (runtimes/mlx_vlm_seam.py) and the MLX vision encoder (mlx_vision.py), which the
exporter builds too; so it sits beside both rather than in runtimes/ or export/."""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

from .errors import BackendUnavailableError

MLX_VLM_VERSION = "0.7.10"  # the modules' attribute names and call signatures edgevlm was written against
INSTALL = f"pip install --no-deps mlx-vlm=={MLX_VLM_VERSION}"


def import_module(family: str, name: str) -> types.ModuleType:
    """mlx_vlm.models.<family>.<name> without the packages' __init__ (no torch, no transformers)."""
    if "mlx_vlm" not in sys.modules:
        spec = importlib.util.find_spec("mlx_vlm")
        if spec is None:
            raise BackendUnavailableError(f"mlx-vlm is not installed; edgevlm's MLX decoders of Qwen2-VL, Qwen3-VL and "
                                          f"Gemma 3 and its MLX vision encoders run its modules: `{INSTALL}`")
        _check_version()
        root = Path(spec.submodule_search_locations[0])
        _namespace("mlx_vlm", root)
        _namespace("mlx_vlm.models", root / "models")
    package = f"mlx_vlm.models.{family}"
    if package not in sys.modules and not hasattr(sys.modules["mlx_vlm"], "__file__"):  # ours, not the real one
        _namespace(package, Path(sys.modules["mlx_vlm.models"].__path__[0]) / family)
    return importlib.import_module(f"{package}.{name}")


def _namespace(name: str, folder: Path) -> None:
    module = types.ModuleType(name)
    module.__path__ = [str(folder)]
    sys.modules[name] = module


def _check_version() -> None:
    from importlib.metadata import version

    found = version("mlx-vlm")
    if found.split(".")[:2] != MLX_VLM_VERSION.split(".")[:2]:
        raise BackendUnavailableError(f"mlx-vlm {found} is installed; edgevlm's MLX paths are written against "
                                      f"{MLX_VLM_VERSION}: `{INSTALL}`")
