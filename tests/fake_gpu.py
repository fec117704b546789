"""Fake `tensorrt` and cuda-python (`cuda.bindings.runtime`) modules for the TensorRT path where no GPU exists. They
record what edgevlm asks of the TensorRT 10 API and of CUDA's runtime, in order, and move real bytes: device memory is
host bytearrays, and the fake engine computes a known function of its input (each output row of tile i is the sum of
tile i's pixels), so a test sees whether the input really went in, through the engine, and came back."""
from __future__ import annotations

import ctypes
import enum
import sys
import types

import numpy as np


def fake_modules(version: str = "10.3.0", device: str = "Fake GPU", devices: int = 1) -> dict[str, types.ModuleType]:
    """{"tensorrt", "cuda", "cuda.bindings", "cuda.bindings.runtime"}, sharing one record (`tensorrt.calls`) and one
    device memory."""
    calls: dict = {"flags": [], "profiles": [], "parsed": [], "qdq_ops": set(), "calibrator": None, "cuda": []}
    memory: dict[int, bytearray] = {}

    # ---- CUDA runtime ---------------------------------------------------------------------------------------------
    class cudaError_t(enum.IntEnum):
        cudaSuccess = 0
        cudaErrorNoDevice = 100

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    class cudaStream_t:
        def __init__(self, handle: int):
            self.handle = handle

        def __int__(self) -> int:
            return self.handle

    ok = cudaError_t.cudaSuccess
    cudart = types.ModuleType("cuda.bindings.runtime")
    cudart.cudaError_t, cudart.cudaMemcpyKind, cudart.cudaStream_t = cudaError_t, cudaMemcpyKind, cudaStream_t
    log = calls["cuda"]

    def cudaGetDeviceCount():
        return (ok if devices else cudaError_t.cudaErrorNoDevice), devices

    def cudaGetDeviceProperties(index):
        return ok, types.SimpleNamespace(name=cudart.device_name.encode() + b"\x00", major=8, minor=7)

    def cudaStreamCreate():
        stream = cudaStream_t(0x5000 + len([c for c in log if c[0] == "stream"]))
        log.append(("stream", int(stream)))
        return ok, stream

    def cudaMalloc(nbytes):
        pointer = 0x10_0000 * (len(memory) + 1)
        memory[pointer] = bytearray(nbytes)
        log.append(("malloc", nbytes))
        return ok, pointer

    def cudaMemcpyAsync(dst, src, count, kind, stream):
        if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
            memory[dst][:count] = ctypes.string_at(src, count)
        else:
            ctypes.memmove(dst, bytes(memory[src][:count]), count)
        log.append(("copy", kind.name.removeprefix("cudaMemcpy"), count, int(stream) if stream is not None else 0))
        return (ok,)

    def cudaStreamSynchronize(stream):
        log.append(("sync", int(stream)))
        return (ok,)

    def cudaFree(pointer):
        del memory[pointer]
        log.append(("free", pointer))
        return (ok,)

    def cudaStreamDestroy(stream):
        log.append(("destroy", int(stream)))
        return (ok,)

    cudart.device_name = device
    for fn in (cudaGetDeviceCount, cudaGetDeviceProperties, cudaStreamCreate, cudaMalloc, cudaMemcpyAsync,
               cudaStreamSynchronize, cudaFree, cudaStreamDestroy):
        setattr(cudart, fn.__name__, fn)
    cudart.memory = memory

    # ---- TensorRT -------------------------------------------------------------------------------------------------
    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    class Profile:
        def set_shape(self, name, min_shape, opt_shape, max_shape):
            calls["profiles"].append((name, min_shape, opt_shape, max_shape))

    class Cache:
        def serialize(self):
            return b"timing-cache"

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = size

        def add_optimization_profile(self, profile):
            calls["profile_added"] = True

        def set_flag(self, flag):
            calls["flags"].append(flag)

        def create_timing_cache(self, data):
            calls["timing_cache_in"] = bytes(data)
            return Cache()

        def set_timing_cache(self, cache, ignore_mismatch):
            calls["ignore_mismatch"] = ignore_mismatch

        def get_timing_cache(self):
            return Cache()

        def __setattr__(self, name, value):  # the deprecated implicit-INT8 calibrator must not be used
            if name == "int8_calibrator":
                calls["calibrator"] = value
            object.__setattr__(self, name, value)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return object()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"fake-plan:" + ",".join(sorted(calls["qdq_ops"])).encode()

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            import onnx

            calls["parsed"].append(path)
            model = onnx.load(path)
            calls["qdq_ops"] = {n.op_type for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
            calls["qdq_int8"] = all(init.data_type == onnx.TensorProto.INT8
                                    for init in model.graph.initializer if init.name.endswith("_zero_point"))
            return True

    class Context:
        """The engine of the profile the last build asked for: (tiles, 3, H, W) -> (tiles, tokens, width)."""

        def __init__(self, engine):
            self.engine, self.shapes, self.addresses = engine, {}, {}

        def set_input_shape(self, name, shape):
            _, low, _, high = calls["profiles"][-1]
            if not low[0] <= shape[0] <= high[0]:
                return False
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            tiles = next(iter(self.shapes.values()))[0]
            return (tiles, *self.engine.output_tail)

        def set_tensor_address(self, name, pointer):
            self.addresses[name] = pointer

        def execute_async_v3(self, stream_handle):
            (in_name, shape), = self.shapes.items()
            out_name = next(n for n in self.addresses if n != in_name)
            pixels = np.frombuffer(bytes(memory[self.addresses[in_name]][: int(np.prod(shape)) * 4]), np.float32)
            sums = pixels.reshape(shape[0], -1).sum(axis=1, dtype=np.float32)
            out = np.broadcast_to(sums[:, None, None], self.get_tensor_shape(out_name)).astype(np.float32)
            memory[self.addresses[out_name]][: out.nbytes] = out.tobytes()
            log.append(("execute", int(stream_handle), shape[0]))
            return True

    class Engine:
        output_tail = (4, 8)  # (tokens, width): set by the test to the bundle's

        def get_tensor_dtype(self, name):
            return "float32"

        def create_execution_context(self):
            return Context(self)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            return Engine() if bytes(plan).startswith(b"fake-plan") else None

    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = calls
    trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime, trt.Engine = Logger, Builder, OnnxParser, Runtime, Engine
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8")
    trt.nptype = np.dtype

    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime, cuda.bindings = cudart, bindings
    return {"tensorrt": trt, "cuda": cuda, "cuda.bindings": bindings, "cuda.bindings.runtime": cudart}


def install(modules: dict[str, types.ModuleType]) -> None:
    """Into sys.modules, for a subprocess that has no pytest monkeypatch."""
    sys.modules.update(modules)
