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
quiet "${PIP[@]}" install --upgrade pip wheel setuptools
quiet "${PIP[@]}" install torch==2.13.0

mkdir -p "$WHEELHOUSE"
if ! ls "$WHEELHOUSE"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $LLAMA_CPP_VERSION from source once (about 9 minutes on 2 cores); cached in $WHEELHOUSE"
  # libmtmd (llama.cpp's own multimodal lib) is not used: edgevlm feeds its own image embeddings.
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" \
    "${PIP[@]}" wheel --no-deps "llama-cpp-python==$LLAMA_CPP_VERSION" -w "$WHEELHOUSE"
fi
quiet "${PIP[@]}" install --find-links "$WHEELHOUSE" -e ".[all]"
"$VENV/bin/python" - <<'PY'
import torch, llama_cpp, onnxruntime, gguf  # fail here, not in the middle of a test run
assert "+cpu" in torch.__version__ or not torch.cuda.is_available(), torch.__version__
print(f"edgevlm venv ready: torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}, onnxruntime {onnxruntime.__version__}")
PY
