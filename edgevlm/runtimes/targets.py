"""Target profiles (encoder backend + decoder backend + precisions) and what this machine can run."""
from __future__ import annotations

import platform
import shutil

TARGETS = {
    "cpu": {"encoder": "onnx:int8 (ORT CPU)", "decoder": "gguf:q8_0 (llama.cpp CPU)",
            "needs": ["onnxruntime", "llama_cpp"]},
    "cuda": {"encoder": "tensorrt:fp16 or onnx (ORT CUDA)", "decoder": "gguf (llama.cpp CUDA build)",
             "needs": ["cuda_gpu", "tensorrt_or_ort_cuda", "llama_cpp_gpu"]},
    "jetson-orin": {"encoder": "tensorrt:int8/fp16 (engine built on the device)", "decoder": "gguf (llama.cpp CUDA build)",
                    "needs": ["jetson", "cuda_gpu", "tensorrt", "llama_cpp_gpu"]},
    "apple-silicon": {"encoder": "mlx:fp16/8bit (MLX Metal; idefics3, llava-CLIP) or onnx (ORT CoreML, else CPU)",
                      "decoder": "mlx:4bit/8bit (MLX Metal)",
                      "needs": ["apple_silicon", "mlx_metal", "onnxruntime"]},
}


def detect() -> dict:
    found: dict = {"platform": f"{platform.system()} {platform.machine()}", "python": platform.python_version()}
    try:
        import onnxruntime as ort

        found["onnxruntime"] = ort.__version__
        found["ort_providers"] = ort.get_available_providers()
    except ImportError:
        found["onnxruntime"] = None
        found["ort_providers"] = []
    found["cuda_gpu"] = cuda_gpu_name()
    try:
        import tensorrt

        found["tensorrt"] = tensorrt.__version__
    except ImportError:
        found["tensorrt"] = None
    try:
        import llama_cpp

        info = llama_cpp.llama_print_system_info().decode()
        found["llama_cpp"] = llama_cpp.__version__
        found["llama_cpp_gpu_offload"] = bool(llama_cpp.llama_supports_gpu_offload())
        found["llama_cpp_system_info"] = info
    except ImportError:
        found["llama_cpp"] = None
        found["llama_cpp_gpu_offload"] = False
    try:
        import mlx.core as mx

        found["mlx"] = str(mx.default_device())
        found["mlx_metal"] = bool(mx.metal.is_available())
    except ImportError:
        found["mlx"] = None
        found["mlx_metal"] = False
    found["jetson"] = bool(shutil.os.path.exists("/etc/nv_tegra_release"))
    found["apple_silicon"] = platform.system() == "Darwin" and platform.machine() == "arm64"
    found["llama_mtmd_cli"] = shutil.which("llama-mtmd-cli")
    found["llama_bench"] = shutil.which("llama-bench")
    return found


def _missing(found: dict, need: str) -> str | None:
    checks = {
        "onnxruntime": (found["onnxruntime"], "onnxruntime is not installed"),
        "llama_cpp": (found["llama_cpp"], "llama-cpp-python is not installed"),
        "cuda_gpu": (found["cuda_gpu"], "no CUDA GPU visible (CUDA's runtime through cuda-python, then nvidia-smi)"),
        "tensorrt": (found["tensorrt"], "TensorRT is not installed"),
        "tensorrt_or_ort_cuda": (found["tensorrt"] or "CUDAExecutionProvider" in found["ort_providers"],
                                 "neither TensorRT nor onnxruntime-gpu is installed"),
        "llama_cpp_gpu": (found["llama_cpp_gpu_offload"], "llama-cpp-python was built without GPU offload (CMAKE_ARGS=-DGGML_CUDA=on)"),
        "jetson": (found["jetson"], "not a Jetson (/etc/nv_tegra_release missing)"),
        "apple_silicon": (found["apple_silicon"], "not an Apple Silicon Mac"),
        "mlx_metal": (found["mlx_metal"], "MLX has no Metal device here" if found["mlx"] else "MLX is not installed"),
    }
    ok, why = checks[need]
    return None if ok else why


def profiles(found: dict | None = None) -> list[dict]:
    found = found or detect()
    rows = []
    for name, target in TARGETS.items():
        missing = [m for m in (_missing(found, need) for need in target["needs"]) if m]
        rows.append({"name": name, "encoder": target["encoder"], "decoder": target["decoder"],
                     "available": not missing, "why": "; ".join(missing) or "all parts present"})
    return rows


def cuda_gpu_name() -> str | None:
    """The first CUDA GPU's name: from CUDA's runtime (cuda-python, as the TensorRT encoder uses it), else from
    nvidia-smi; never from torch (every sweep node runs `targets`, and a device has no torch)."""
    import shutil
    import subprocess

    from ..backends import gpu_identity

    try:
        return gpu_identity()["gpu"] or None
    except Exception:  # noqa: BLE001 - no cuda-python, no driver, no device: ask nvidia-smi
        pass
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else None
