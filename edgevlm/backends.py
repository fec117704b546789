"""Backend availability and process-wide backend setup, shared by export and the runtimes (a leaf module: export
and runtimes never import each other). Each `require_*` returns the module or raises BackendUnavailableError."""
from __future__ import annotations

import ctypes
import os

from .errors import BackendUnavailableError

# ggml.h's enum ggml_log_level (llama-cpp-python does not export it)
GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR = 3, 4
_LOG_CALLBACK = None


def physical_cores() -> int:
    """Default thread count: physical cores, as llama.cpp and ONNX Runtime choose (hyper-threads only contend)."""
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


MAX_THREADS = 1024


def thread_count(threads: int | None) -> int:
    """A validated thread count (default: physical cores): the C libraries take it as a 32-bit int, and a huge or
    negative one crashed llama.cpp instead of failing."""
    from .errors import BadInputError

    if threads is None:
        return physical_cores()
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise BadInputError(f"--threads must be 1..{MAX_THREADS}, got {threads!r}")
    return threads


def _promote_libstdcxx() -> None:
    """Seen on an H200 (CUDA 13, llama-cpp-python 0.3.36 built with -DGGML_CUDA=on): libggml-cuda.so exports copies
    of libstdc++'s stream templates; once numpy or tokenizers has loaded libstdc++ privately, llama.cpp's model load
    calls into those copies and dies with SIGSEGV in llama_model::print_info. Making the system libstdc++ global
    before llama.cpp loads (what LD_PRELOAD=libstdc++.so.6 also fixes) keeps the calls in one library."""
    import ctypes.util

    name = ctypes.util.find_library("stdc++")
    if name and os.name == "posix":
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            pass


def require_llama_cpp():
    _promote_libstdcxx()
    try:
        import llama_cpp
    except ImportError as exc:
        raise BackendUnavailableError(
            f"llama-cpp-python is not installed ({exc}); `pip install llama-cpp-python==0.3.36` (see docs/usage.md#install)"
        ) from None
    return llama_cpp


def require_mtmd():
    """llama.cpp's multimodal library (libmtmd) through llama-cpp-python; absent from wheels built with
    -DLLAVA_BUILD=OFF, where loading llama_cpp.mtmd_cpp fails to find the shared library."""
    require_llama_cpp()
    try:
        from llama_cpp import mtmd_cpp
    except (ImportError, OSError, FileNotFoundError) as exc:
        raise BackendUnavailableError(
            f"llama-cpp-python was built without libmtmd ({str(exc)[:120]}); rebuild it with -DLLAVA_BUILD=ON "
            "(scripts/setup-venv.sh does)") from None
    return mtmd_cpp


def silence_llama_logs(llama_cpp) -> None:
    """llama.cpp logs every tensor at load; keep warnings and errors, and print them only when EDGEVLM_LLAMA_LOG is set."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        def callback(level, text, user_data):
            if level in (GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR) and os.environ.get("EDGEVLM_LLAMA_LOG"):
                print(text.decode(errors="replace"), end="")

        _LOG_CALLBACK = llama_cpp.llama_log_callback(callback)
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


def silence_mtmd_logs(llama_cpp, mtmd_cpp) -> None:
    """clip.cpp and mtmd log through their own hooks (every key and tensor at load): same rule as llama.cpp's."""
    silence_llama_logs(llama_cpp)
    mtmd_cpp.mtmd_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_helper_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


def require_mlx(mlx_lm: bool = True):
    """mlx_lm=False: MLX alone (mlx-vlm's language models through runtimes/mlx_vlm_seam.py); `import mlx_lm` itself
    imports transformers and torch (3 s here)."""
    try:
        import mlx.core  # noqa: F401

        if mlx_lm:
            import mlx_lm as _  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError(
            f"MLX is not available here ({exc}); on Linux `pip install 'mlx[cpu]' mlx-lm`, on Apple Silicon "
            "`pip install mlx mlx-lm`"
        ) from None


def require_cuda_runtime():
    """CUDA's runtime API through NVIDIA's cuda-python (`cuda.bindings.runtime`; `cuda.cudart` before 12.6): device
    buffers, one stream and the copies, without torch (the on-device runtime imports no torch)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as exc:
            raise BackendUnavailableError(
                f"cuda-python is not installed ({exc}); TensorRT needs it for device buffers: `pip install cuda-python` "
                "(on Jetson it comes with JetPack's Python packages)") from None
    return cudart


def cuda_call(cudart, result):
    """cuda-python returns (cudaError_t, *values): raise on an error, return the values (one value unwrapped)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        name = getattr(err, "name", str(err))
        raise BackendUnavailableError(f"CUDA call failed: {name}; is the NVIDIA driver loaded and a GPU visible?")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(
            f"TensorRT is not installed ({exc}); it needs an NVIDIA GPU: on Jetson it comes with JetPack, elsewhere "
            "`pip install tensorrt` from NVIDIA's index"
        ) from None
    cudart = require_cuda_runtime()
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count < 1:
        raise BackendUnavailableError(f"TensorRT needs a CUDA GPU; none is visible here ({getattr(err, 'name', err)})")
    return trt


def gpu_identity() -> dict:
    """The device a TensorRT engine is built for and must run on (engines do not move between GPUs)."""
    cudart = require_cuda_runtime()
    props = cuda_call(cudart, cudart.cudaGetDeviceProperties(0))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return {"gpu": name.rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}"}
