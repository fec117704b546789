"""Encoder backend on a TensorRT engine built on this device (`edgevlm build-engine`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BadInputError, BundleError
from ..backends import gpu_identity, require_tensorrt
from .base import Encoder


# A grid encoder's engine would need an optimisation profile over the patch axis and int64 position inputs; not built
GRID_REFUSAL = ("the TensorRT encoder runs fixed-size tiles only; this bundle's native-resolution (grid) encoder runs "
                "on ONNX Runtime: choose --encoder onnx:fp32 or onnx:int8")


class TensorRTEncoder(Encoder):
    name = "tensorrt"

    def __init__(self, bundle: Path, artifact, encoder_spec):
        if encoder_spec.kind != "tiles":
            raise BundleError(GRID_REFUSAL)
        trt = require_tensorrt()
        import torch

        artifact.verify(bundle)
        gpu = gpu_identity()["gpu"]
        if artifact.details.get("gpu") != gpu or artifact.details.get("tensorrt_version") != trt.__version__:
            raise BundleError(
                f"{artifact.path} was built for {artifact.details.get('gpu')} with TensorRT "
                f"{artifact.details.get('tensorrt_version')}; this is {gpu} with TensorRT {trt.__version__}: rebuild it "
                "with `edgevlm build-engine`"
            )
        self._torch = torch
        self.spec = encoder_spec
        self.max_tiles = int(artifact.details["tiles"]["max"])
        self.artifact_id = f"{artifact.name}:{artifact.files[0].sha256}"
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine((bundle / artifact.path).read_bytes())
        if self.engine is None:
            raise BundleError(f"TensorRT could not deserialize {artifact.path}; rebuild it with `edgevlm build-engine`")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.provider = f"TensorRT {trt.__version__} on {gpu}"

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        torch = self._torch
        inputs = torch.from_numpy(chunk).cuda()
        if not self.context.set_input_shape(self.spec.input_name, tuple(inputs.shape)):
            raise BadInputError(f"the TensorRT engine refuses input shape {tuple(inputs.shape)} (its profile allows "
                                f"1..{self.max_tiles} tiles)")
        out_shape = tuple(self.context.get_tensor_shape(self.spec.output_name))
        output = torch.empty(out_shape, dtype=torch.float32, device="cuda")
        self.context.set_tensor_address(self.spec.input_name, inputs.data_ptr())
        self.context.set_tensor_address(self.spec.output_name, output.data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        return output.cpu().numpy()

    def encode(self, pixel_values: np.ndarray, grid: tuple[int, int, int] | None = None) -> np.ndarray:
        if grid is not None:
            raise BundleError(GRID_REFUSAL)
        expected = tuple(self.spec.input_shape[1:])
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise BadInputError(f"encoder input must be (tiles, {', '.join(map(str, expected))}), got {pixel_values.shape}")
        pixel_values = np.ascontiguousarray(pixel_values, dtype=np.float32)
        return np.concatenate([self._run(pixel_values[i : i + self.max_tiles])
                               for i in range(0, len(pixel_values), self.max_tiles)])
