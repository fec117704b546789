"""Encoder backend on a TensorRT engine built on this device (`edgevlm build-engine`). Device memory and the stream
come from CUDA's runtime through cuda-python, not torch (the on-device runtime imports no torch).

Not run on hardware: no GPU was available where it was written; tests/test_tensorrt.py runs it against fake
`tensorrt` and cuda-python modules that record the calls (copies, stream, order)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..backends import cuda_call, gpu_identity, require_cuda_runtime, require_tensorrt
from ..errors import BadInputError, BundleError
from .base import Encoder

# A grid encoder's engine would need an optimisation profile over the patch axis and int64 position inputs; not built
GRID_REFUSAL = ("the TensorRT encoder runs fixed-size tiles only; this bundle's native-resolution (grid) encoder runs "
                "on ONNX Runtime: choose --encoder onnx:fp32 or onnx:int8")


class TensorRTEncoder(Encoder):
    """One CUDA stream carries every step of a run in order (input copy, the engine, output copy), and the host waits
    on that stream before it reads the output. Device buffers are sized once for the engine's largest profile."""

    name = "tensorrt"

    def __init__(self, bundle: Path, artifact, encoder_spec):
        if encoder_spec.kind != "tiles":
            raise BundleError(GRID_REFUSAL)
        trt = require_tensorrt()
        self._cudart = cudart = require_cuda_runtime()
        self.stream, self._device = None, []  # what close() frees, whatever fails below
        artifact.verify(bundle)
        gpu = gpu_identity()["gpu"]
        if artifact.details.get("gpu") != gpu or artifact.details.get("tensorrt_version") != trt.__version__:
            raise BundleError(
                f"{artifact.path} was built for {artifact.details.get('gpu')} with TensorRT "
                f"{artifact.details.get('tensorrt_version')}; this is {gpu} with TensorRT {trt.__version__}: rebuild it "
                "with `edgevlm build-engine`"
            )
        self.spec = encoder_spec
        self.max_tiles = int(artifact.details["tiles"]["max"])
        self.artifact_id = f"{artifact.name}:{artifact.files[0].sha256}"
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine((bundle / artifact.path).read_bytes())
        if self.engine is None:
            raise BundleError(f"TensorRT could not deserialize {artifact.path}; rebuild it with `edgevlm build-engine`")
        self.context = self.engine.create_execution_context()
        self._out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(encoder_spec.output_name)))
        self._in_bytes = self.max_tiles * int(np.prod(encoder_spec.input_shape[1:])) * 4  # float32 input
        self._out_bytes = self._out_nbytes(self.max_tiles)
        self.stream = cuda_call(cudart, cudart.cudaStreamCreate())
        self._d_in = self._alloc(self._in_bytes)
        self._d_out = self._alloc(self._out_bytes)
        self.provider = f"TensorRT {trt.__version__} on {gpu}"

    def _alloc(self, nbytes: int) -> int:
        pointer = cuda_call(self._cudart, self._cudart.cudaMalloc(nbytes))
        self._device.append(pointer)
        return pointer

    def _out_nbytes(self, tiles: int) -> int:
        if not self.context.set_input_shape(self.spec.input_name, (tiles, *self.spec.input_shape[1:])):
            raise BundleError(f"the TensorRT engine refuses {tiles} tiles, the bound its manifest entry states; rebuild "
                              "it with `edgevlm build-engine`")
        return int(np.prod(self.context.get_tensor_shape(self.spec.output_name))) * self._out_dtype.itemsize

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        cudart = self._cudart
        kind = cudart.cudaMemcpyKind
        if not self.context.set_input_shape(self.spec.input_name, tuple(chunk.shape)):
            raise BadInputError(f"the TensorRT engine refuses input shape {tuple(chunk.shape)} (its profile allows "
                                f"1..{self.max_tiles} tiles)")
        output = np.empty(tuple(self.context.get_tensor_shape(self.spec.output_name)), dtype=self._out_dtype)
        if chunk.nbytes > self._in_bytes or output.nbytes > self._out_bytes:  # the profile bounds both
            raise BadInputError(f"{len(chunk)} tiles exceed the engine's device buffers ({self.max_tiles} tiles)")
        self.context.set_tensor_address(self.spec.input_name, self._d_in)
        self.context.set_tensor_address(self.spec.output_name, self._d_out)
        cuda_call(cudart, cudart.cudaMemcpyAsync(self._d_in, chunk.ctypes.data, chunk.nbytes,
                                                 kind.cudaMemcpyHostToDevice, self.stream))
        if not self.context.execute_async_v3(int(self.stream)):
            raise RuntimeError("TensorRT execution failed")
        cuda_call(cudart, cudart.cudaMemcpyAsync(output.ctypes.data, self._d_out, output.nbytes,
                                                 kind.cudaMemcpyDeviceToHost, self.stream))
        cuda_call(cudart, cudart.cudaStreamSynchronize(self.stream))  # the host reads `output` only after this
        return output.astype(np.float32, copy=False)

    def encode(self, pixel_values: np.ndarray, grid: tuple[int, int, int] | None = None,
               instruction: np.ndarray | None = None) -> np.ndarray:
        if grid is not None:
            raise BundleError(GRID_REFUSAL)
        if instruction is not None or self.spec.instruction:
            raise BundleError("the TensorRT encoder takes pixels only; an encoder that reads the instruction too "
                              "(InstructBLIP) runs on ONNX Runtime (--encoder onnx:...)")
        expected = tuple(self.spec.input_shape[1:])
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise BadInputError(f"encoder input must be (tiles, {', '.join(map(str, expected))}), got {pixel_values.shape}")
        pixel_values = np.ascontiguousarray(pixel_values, dtype=np.float32)
        return np.concatenate([self._run(pixel_values[i : i + self.max_tiles])
                               for i in range(0, len(pixel_values), self.max_tiles)])

    def close(self) -> None:
        """Free the device buffers and the stream (also at garbage collection)."""
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        while self._device:
            cudart.cudaFree(self._device.pop())
        if self.stream is not None:
            cudart.cudaStreamDestroy(self.stream)
            self.stream = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have taken cuda-python already
            pass
