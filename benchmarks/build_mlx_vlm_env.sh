#!/usr/bin/env bash
# Build the mlx-vlm benchmark peer's own virtual environment: mlx-vlm with its declared dependencies (opencv,
# datasets, mlx-audio, fastapi, ...; ~67 packages, ~1.1 GB, no torch), kept out of edgevlm's venv and of
# edgevlm[runtime]. `edgevlm bench --peers ...,mlx-vlm` finds it here by default (edgevlm/bench/peers/external.py).
# Cached in ~/.cache/edgevlm/peers/mlx-vlm-<version>/ (EDGEVLM_PEER_CACHE moves the root); idempotent: a complete
# environment (marked by .edgevlm-ready) returns at once. All wheels (nothing compiles here): ~1-2 min on first build.
#   benchmarks/build_mlx_vlm_env.sh            build if missing, print the environment's Python
#   benchmarks/build_mlx_vlm_env.sh --print    print it if built (exit 1 if not), build nothing
# Environment: PYTHON (the interpreter to make the venv from; default python3.11, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.7.10  # edgevlm/mlx_vlm_modules.py MLX_VLM_VERSION (one pin)
ROOT=${EDGEVLM_PEER_CACHE:-$HOME/.cache/edgevlm/peers}
ENV="$ROOT/mlx-vlm-$VERSION"
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}

if [ "${1:-}" = --print ]; then [ -f "$ENV/.edgevlm-ready" ] && echo "$ENV/bin/python" && exit 0; exit 1; fi
if [ -f "$ENV/.edgevlm-ready" ]; then echo "$ENV/bin/python"; exit 0; fi

mkdir -p "$ROOT"
WORK=$(mktemp -d "$ROOT/.build-XXXXXX")
trap 'rm -rf "$WORK"' EXIT
echo "building the mlx-vlm $VERSION peer environment in $ENV" >&2
# Constraints: no torch enters (mlx-vlm's generate path does not need it; if a dependency ever asked for it, the CPU
# build edgevlm pins, never a CUDA one), and the transformers edgevlm's PyTorch reference runs, so both sides
# tokenize and preprocess with the same library version.
cat > "$WORK/constraints.txt" <<EOF
torch==2.13.0
transformers==5.23.0
EOF
# built at its final path (a venv's scripts hold absolute paths), marked ready only when complete
rm -rf "$ENV"
"$PYTHON" -m venv "$ENV"
"$ENV/bin/python" -m pip -q --disable-pip-version-check install -c "$WORK/constraints.txt" \
  "mlx-vlm==$VERSION" "mlx[cpu]==0.32.*" >&2
if "$ENV/bin/python" -c "import importlib.util as u; raise SystemExit(u.find_spec('torch') is not None)"; then :; else
  echo "torch entered the mlx-vlm peer environment; it must not" >&2; exit 3
fi
"$ENV/bin/python" -c "from mlx_vlm import load, stream_generate; from mlx_vlm.convert import convert" >&2
"$ENV/bin/python" -m pip freeze > "$ENV/edgevlm-freeze.txt"
touch "$ENV/.edgevlm-ready"
echo "$ENV/bin/python"
