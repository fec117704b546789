"""Encoder backend on MLX: the vision half of a tiled family (tower, bridge, projector) through mlx-vlm's vision
modules (edgevlm/mlx_vision.py), so a Mac runs the whole split graph on MLX beside the MLX decoder, without ONNX
Runtime's CoreML provider. Runs on mlx[cpu] here (tests, verify); not run on Apple Silicon (Metal) yet."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..backends import require_mlx
from ..errors import BadInputError, BundleError
from .base import Encoder


class MlxEncoder(Encoder):
    name = "mlx"

    def __init__(self, bundle: Path, artifact, encoder_spec):
        if encoder_spec.kind != "tiles" or encoder_spec.instruction:
            raise BundleError("the MLX encoder runs fixed-size tiles read from pixels only; choose --encoder onnx:...")
        require_mlx(mlx_lm=False)
        import mlx.core as mx

        from ..mlx_vision import TILE_BATCH, load

        artifact.verify(bundle)
        self._mx = mx
        self.spec = encoder_spec
        self.precision = artifact.precision
        self.artifact_id = f"{artifact.name}:{artifact.files[0].sha256}"
        self.graph_bytes = artifact.bytes
        self.model, self.config = load(bundle / artifact.path)
        self.tiles_per_call = TILE_BATCH
        device = mx.default_device()
        self.provider = f"MLX {mx.__version__} on {device}"
        self.name = f"mlx-{'gpu' if device == mx.gpu else 'cpu'}"

    def encode(self, pixel_values: np.ndarray, grid: tuple[int, int, int] | None = None,
               instruction: np.ndarray | None = None) -> np.ndarray:
        """tiles (tiles, 3, H, W) float32 -> (tiles, T, D) float32."""
        if grid is not None or instruction is not None:
            raise BadInputError("the MLX encoder takes fixed-size tiles (tiles, 3, H, W) only")
        expected = tuple(self.spec.input_shape[1:])
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise BadInputError(f"encoder input must be (tiles, {', '.join(map(str, expected))}), got {pixel_values.shape}")
        mx = self._mx
        nhwc = np.ascontiguousarray(np.asarray(pixel_values, dtype=np.float32).transpose(0, 2, 3, 1))  # MLX convs
        outputs = []
        for start in range(0, len(nhwc), self.tiles_per_call):
            out = self.model(mx.array(nhwc[start : start + self.tiles_per_call])).astype(mx.float32)
            mx.eval(out)
            outputs.append(np.array(out, copy=True))
        return np.concatenate(outputs)  # (tiles, T, D)
