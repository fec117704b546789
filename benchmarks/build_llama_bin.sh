#!/usr/bin/env bash
# Build llama.cpp's own programs (llama-server, llama-bench, llama-mtmd-cli) from the llama.cpp that the pinned
# llama-cpp-python vendors, with the instruction-set flags of the wheel scripts/setup-venv.sh built for this CPU, so
# the peers run the same kernels as edgevlm's llama.cpp decoder. Cached in ~/.cache/edgevlm/llama-bin/<key>/, the key
# made of the version and the flags: a fresh machine builds once (~10 min on 2 idle cores, ~25-40 min at low priority
# beside other work), later calls return at once. Prints the folder holding the programs on its last line.
#   benchmarks/build_llama_bin.sh            build if missing, print the folder
#   benchmarks/build_llama_bin.sh --print    print the folder if it is built (exit 1 if not), build nothing
# Environment: PYTHON (runs pip download; default .venv/bin/python, else python3), JOBS (default 1), NICE (default 19),
# EDGEVLM_WHEELHOUSE, EDGEVLM_LLAMA_BIN_CACHE (the cache root).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
TARGETS=(llama-server llama-bench llama-mtmd-cli)
WHEELHOUSE=${EDGEVLM_WHEELHOUSE:-$HOME/.cache/edgevlm/wheelhouse}
ROOT=${EDGEVLM_LLAMA_BIN_CACHE:-$HOME/.cache/edgevlm/llama-bin}
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
JOBS=${JOBS:-1}
NICE=${NICE:-19}

# The wheel's KEY records this CPU's flags as setup-venv.sh computed them; take the wheel built for this CPU.
CPU_FLAGS=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | tr ' ' '\n' | grep -E '^(avx|fma|f16c|sse|amx|bmi)' | sort | tr '\n' ' ' || true)
KEY_FILE=""
for key in "$WHEELHOUSE"/llama-cpp-python-"$VERSION"-*/KEY; do
  [ -f "$key" ] || continue
  if [ "$(sed -n 's/^cpu_flags=//p' "$key")" = "$CPU_FLAGS" ]; then KEY_FILE=$key; break; fi
done
if [ -z "$KEY_FILE" ]; then
  echo "no llama-cpp-python $VERSION wheel built for this CPU in $WHEELHOUSE: run scripts/setup-venv.sh (make venv) first" >&2
  exit 2
fi
# the ISA flags only: libmtmd is built here through its own target whatever LLAVA_BUILD says
ISA=$(sed -n 's/^cmake_args=//p' "$KEY_FILE" | sed 's/-DLLAVA_BUILD=[A-Z]*//')
BIN_KEY=$(printf '%s|%s|%s|%s' "$VERSION" "$ISA" "${TARGETS[*]}" "$(uname -m)" | sha256sum | cut -c1-16)
BIN_DIR="$ROOT/$VERSION-$BIN_KEY"

built() { for t in "${TARGETS[@]}"; do [ -x "$BIN_DIR/$t" ] || return 1; done; }
if [ "${1:-}" = --print ]; then built && echo "$BIN_DIR" && exit 0; exit 1; fi
if built; then echo "$BIN_DIR"; exit 0; fi

mkdir -p "$ROOT"
WORK=$(mktemp -d "$ROOT/.build-XXXXXX")
trap 'rm -rf "$WORK"' EXIT
echo "building ${TARGETS[*]} from llama-cpp-python $VERSION's vendored llama.cpp into $BIN_DIR (nice $NICE, -j$JOBS)" >&2
"$PYTHON" -m pip -q --disable-pip-version-check download "llama-cpp-python==$VERSION" --no-binary :all: --no-deps \
  -d "$WORK" >&2
tar xzf "$WORK/llama_cpp_python-$VERSION.tar.gz" -C "$WORK" "llama_cpp_python-$VERSION/vendor/llama.cpp"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
# Nothing is downloaded during the build: the server's web UI would otherwise be fetched prebuilt, and HTTPS/curl
# support is not needed for a server on loopback.
# shellcheck disable=SC2086  # ISA is a list of -D flags
nice -n "$NICE" cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF $ISA >&2
nice -n "$NICE" cmake --build "$WORK/build" --target "${TARGETS[@]}" -j"$JOBS" >&2
# moved in whole, so an interrupted build leaves no half folder behind
mkdir -p "$WORK/out"
for t in "${TARGETS[@]}"; do cp "$WORK/build/bin/$t" "$WORK/out/"; done
# the sdist carries no git metadata (the binaries say "commit unknown"): its changelog names the vendored commit
tar xzf "$WORK/llama_cpp_python-$VERSION.tar.gz" -C "$WORK" "llama_cpp_python-$VERSION/CHANGELOG.md"
COMMIT=$(grep -m1 -o 'ggml-org/llama.cpp@[0-9a-f]*' "$WORK/llama_cpp_python-$VERSION/CHANGELOG.md" | cut -d@ -f2 || true)
printf 'version=%s\nisa=%s\ntargets=%s\nwheel_key=%s\nllama_cpp=%s\nllama_cpp_commit=%s\n' "$VERSION" "${ISA# }" \
  "${TARGETS[*]}" "$(basename "$(dirname "$KEY_FILE")")" \
  "$("$WORK/out/llama-server" --version 2>&1 | grep -m1 -i version || true)" "$COMMIT" > "$WORK/out/KEY"
rm -rf "$BIN_DIR" && mv "$WORK/out" "$BIN_DIR"
echo "$BIN_DIR"
