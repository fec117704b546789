#!/usr/bin/env bash
# Create .venv from nothing: torch first (the CPU wheel pip finds on disk), then llama-cpp-python from a cached
# wheel (built once per machine: ~9 min on 2 cores), then edgevlm with all backends.
set -euo pipefail
VENV=${VENV:-.venv}
WHEELHOUSE=${EDGEVLM_WHEELHOUSE:-$HOME/.cache/edgevlm/wheelhouse}
LLAMA_CPP_VERSION=0.3.36
PYTHON=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }  # pip.conf names an index folder that may be absent
# qemu-user lets the tests run ONNX Runtime's AVX2-only int8 kernels on any x86-64 CPU (tests/test_int8_portability.py)
if [ "$(uname -m)" = x86_64 ] && ! command -v qemu-x86_64 >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "installing qemu-user (Debian) for the int8 portability tests"
  { apt-get install -y -q qemu-user || { apt-get update -q && apt-get install -y -q qemu-user; }; } >/dev/null 2>&1 \
    || echo "warning: could not install qemu-user; the int8 portability tests will not run"
fi
# Chromium (Debian's) is the browser the chat page's test drives through Playwright (tests/test_chat_page.py)
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "installing chromium (Debian) for the chat page's browser test"
  { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; } >/dev/null 2>&1 \
    || echo "warning: could not install chromium; the chat page's browser test will not run"
fi
quiet "${PIP[@]}" install --upgrade pip wheel setuptools
quiet "${PIP[@]}" install torch==2.13.0

# The wheel is keyed by its build flags and by this CPU's instruction sets: it is built for this CPU, so a wheel built
# on an AVX-512 machine would die with SIGILL on an AVX2-only one.
CPU_FLAGS=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | tr ' ' '\n' | grep -E '^(avx|fma|f16c|sse|amx|bmi)' | sort | tr '\n' ' ' || true)
# On x86-64, this CPU's instruction sets one by one instead of -march=native, without AMX: -march=native turns on
# ggml's AMX kernels wherever the CPU lists AMX, and in a VM that does not grant the tile state they die with SIGILL
# (seen on a Sapphire Rapids VM: `tilezero` in ggml_backend_amx_mul_mat). AVX-512 VNNI does the int8 work instead.
ggml_isa_args() {
  local flag option args=(-DGGML_NATIVE=OFF)
  for pair in sse4_2:SSE42 f16c:F16C fma:FMA bmi2:BMI2 avx:AVX avx2:AVX2 avx_vnni:AVX_VNNI avx512f:AVX512 \
              avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    flag=${pair%%:*}; option=${pair##*:}
    if [[ " $CPU_FLAGS " == *" $flag "* ]]; then args+=("-DGGML_$option=ON"); else args+=("-DGGML_$option=OFF"); fi
  done
  args+=(-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
  echo "${args[*]}"
}
if [ -z "${CMAKE_ARGS:-}" ] && [ "$(uname -m)" = x86_64 ]; then
  LLAMA_CMAKE_ARGS="-DLLAVA_BUILD=ON $(ggml_isa_args)"
else
  LLAMA_CMAKE_ARGS=${CMAKE_ARGS:--DLLAVA_BUILD=ON}
fi
WHEEL_KEY=$(printf '%s|%s|%s|%s' "$LLAMA_CPP_VERSION" "$LLAMA_CMAKE_ARGS" "$CPU_FLAGS" "$(uname -m)" | sha256sum | cut -c1-16)
WHEEL_DIR="$WHEELHOUSE/llama-cpp-python-$LLAMA_CPP_VERSION-$WHEEL_KEY"
mkdir -p "$WHEEL_DIR"
if ! ls "$WHEEL_DIR"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $LLAMA_CPP_VERSION from source once (about 9 minutes on 2 cores); cached in $WHEEL_DIR"
  # With libmtmd (llama.cpp's own multimodal library): the mmproj tests and the in-process mtmd bench peer use it.
  # Built into a temporary folder and moved in whole, so an interrupted build leaves no half wheel behind.
  TMP_WHEELS=$(mktemp -d "$WHEELHOUSE/.build-XXXXXX")
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} CMAKE_ARGS="$LLAMA_CMAKE_ARGS" \
    "${PIP[@]}" wheel --no-cache-dir --no-deps "llama-cpp-python==$LLAMA_CPP_VERSION" -w "$TMP_WHEELS"
  mv "$TMP_WHEELS"/llama_cpp_python-*.whl "$WHEEL_DIR"/ && rmdir "$TMP_WHEELS"
  printf 'version=%s\ncmake_args=%s\ncpu_flags=%s\n' "$LLAMA_CPP_VERSION" "$LLAMA_CMAKE_ARGS" "$CPU_FLAGS" > "$WHEEL_DIR/KEY"
fi
# pip keeps an installed llama-cpp-python of the same version, so a venv built from another wheel gets this one
if [ "$(cat "$VENV/.llama-cpp-wheel-key" 2>/dev/null)" != "$WHEEL_KEY" ]; then
  quiet "${PIP[@]}" install --no-deps --force-reinstall "$WHEEL_DIR"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl
  echo "$WHEEL_KEY" > "$VENV/.llama-cpp-wheel-key"
fi
quiet "${PIP[@]}" install --find-links "$WHEEL_DIR" -e ".[all]"
# mlx-vlm's language models run the MLX decoder of Qwen2-VL, Qwen3-VL and Gemma 3 (edgevlm/runtimes/mlx_vlm_seam.py;
# edgevlm/mlx_vlm_modules.py pins the version). --no-deps: its declared dependencies pull opencv, datasets, transformers and audio packages
# that those modules never import, and pyproject's extras cannot say --no-deps.
quiet "${PIP[@]}" install --no-deps "mlx-vlm==$(sed -n 's/^MLX_VLM_VERSION = "\([^"]*\)".*/\1/p' edgevlm/mlx_vlm_modules.py)"
# Tests only: transformers' video processors (the parity reference for video input) need torchvision, and the only
# torchvision wheel for torch 2.13 on the index is a CUDA build whose _C.so cannot load here. Its Python half
# (transforms) works; tests/hf_video.py runs it in a subprocess with this folder on the path. Never on sys.path of
# the tests themselves: transformers would switch every image processor to its torchvision variant.
HF_TORCHVISION="$VENV/hf-torchvision"
if [ ! -f "$HF_TORCHVISION/.ready" ]; then
  rm -rf "$HF_TORCHVISION"
  quiet "${PIP[@]}" install --no-deps --target "$HF_TORCHVISION" torchvision==0.28.0
  rm -f "$HF_TORCHVISION"/torchvision/_C.so && touch "$HF_TORCHVISION/.ready"
fi
"$VENV/bin/python" - <<'PY'
import torch, llama_cpp, llama_cpp.mtmd_cpp, onnxruntime, gguf, mlx.core, mlx_lm, av  # fail here, not mid-test-run
from edgevlm.runtimes.mlx_vlm_seam import FAMILIES, import_language
for family in FAMILIES.values():
    import_language(family)
assert "+cpu" in torch.__version__ or not torch.cuda.is_available(), torch.__version__
print(f"edgevlm venv ready: torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}, onnxruntime {onnxruntime.__version__}")
PY
