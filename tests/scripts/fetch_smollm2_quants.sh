#!/usr/bin/env bash
# The SmolLM2-135M-Instruct files llama.cpp's own quantizer makes (Q2_K ... BF16), for
# tests/tests/quant_files.rs: the wheel's Q4_1 file is written back as all-F32 with the
# `gguf` package, then requantised by llama_model_quantize from the llama.cpp that
# llama-cpp-python==0.3.36 vendors (libllama alone, built here once; its quantizer is
# plain C with no machine-specific code, so the bytes equal the ones the fixture was made
# from). Each file's sha256 is checked against tests/fixtures/smollm2_quants_llamacpp.json.
# Prints the folder on stdout.
#   VIDLLM_CACHE (default ~/.cache/vidllm): where the files, the venv and the build are kept.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
CACHE="${VIDLLM_CACHE:-$HOME/.cache/vidllm}"
OUT="$CACHE/smollm2-quants"
FIXTURE="$ROOT/tests/fixtures/smollm2_quants_llamacpp.json"
SDIST_SHA=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
mkdir -p "$OUT"

# name file sha256 ftype, one line per file of the fixture.
LISTING="$(python3 - "$FIXTURE" <<'PY'
import json, sys
for f in json.load(open(sys.argv[1]))["files"]:
    print(f["name"], f["file"], f["sha256"], f["ftype"])
PY
)"
[ -n "$LISTING" ] || { echo "fetch_smollm2_quants: no files listed in $FIXTURE" >&2; exit 1; }
ok() { [ -f "$OUT/$1" ] && echo "$2  $OUT/$1" | sha256sum -c --status; }

missing=0
while read -r _ file sha _; do ok "$file" "$sha" || missing=1; done <<< "$LISTING"
if [ $missing = 0 ]; then echo "$OUT"; exit 0; fi

SRC="$(bash "$ROOT/tests/scripts/fetch_smollm2.sh")"
VENV="$CACHE/quant-venv"
if [ ! -x "$VENV/bin/cmake" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet gguf==0.19.0 numpy cmake ninja >&2
fi

LLAMA="$CACHE/llama.cpp-0.3.36"
TOOL="$LLAMA/llama_quantize"
if [ ! -x "$TOOL" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  # llama.cpp's sources, as llama-cpp-python's source distribution vendors them.
  echo "llama-cpp-python==0.3.36 --hash=sha256:$SDIST_SHA" > "$tmp/req.txt"
  "$VENV/bin/pip" download --quiet --no-deps --no-binary llama-cpp-python --require-hashes -r "$tmp/req.txt" -d "$tmp" >&2
  tar -xzf "$tmp"/llama_cpp_python-0.3.36.tar.gz -C "$tmp"
  rm -rf "$LLAMA" && mv "$tmp/llama_cpp_python-0.3.36/vendor/llama.cpp" "$LLAMA"
  # libllama and ggml only: no tools, no common library, no machine-specific flags.
  PATH="$VENV/bin:$PATH" cmake -S "$LLAMA" -B "$LLAMA/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >&2
  PATH="$VENV/bin:$PATH" cmake --build "$LLAMA/build" --target llama >&2
  libs=$(find "$LLAMA/build" -name 'libllama.a' -o -name 'libggml*.a' | sort -r)
  c++ -O2 -x c "$ROOT/tests/scripts/llama_quantize.c" -x none -I"$LLAMA/include" -I"$LLAMA/ggml/include" \
    -Wl,--start-group $libs -Wl,--end-group -lpthread -lm -o "$TOOL.part"
  mv "$TOOL.part" "$TOOL"
fi

F32="$OUT/SmolLM2-135M-Instruct.F32.gguf"
if [ ! -f "$F32" ]; then
  (cd "$ROOT/tests/fixtures" && "$VENV/bin/python" -c \
    "import sys, gen_quant_fixtures as g; g.write_f32(sys.argv[1], sys.argv[2])" "$SRC" "$F32.part")
  mv "$F32.part" "$F32"
fi
while read -r name file sha ftype; do
  ok "$file" "$sha" && continue
  "$TOOL" "$F32" "$OUT/$file.part" "$ftype" >/dev/null 2>"$OUT/$file.log" || { cat "$OUT/$file.log" >&2; exit 1; }
  mv "$OUT/$file.part" "$OUT/$file"
  if ! ok "$file" "$sha"; then
    echo "fetch_smollm2_quants: $file differs from the one the fixture was made from (sha256)" >&2; exit 1
  fi
  echo "$name: made by llama.cpp, sha256 checked" >&2
done <<< "$LISTING"
echo "$OUT"
